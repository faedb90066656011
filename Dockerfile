# The node image of jobs/k8s/rayjob.yaml: Ray's own image, a CUDA (or CPU) torch, and this project.
#
#   docker build -t my-registry/sam-annotate:0.1.0 .                            # GPU nodes (default)
#   docker build --build-arg VARIANT=cpu -t my-registry/sam-annotate:0.1.0-cpu .  # CPU-only nodes
#   docker push my-registry/sam-annotate:0.1.0
#
# Build args: RAY_VERSION (must equal rayjob.yaml's rayVersion), PYTHON_VERSION (Ray's tag form,
# py311), VARIANT (gpu or cpu: picks Ray's `-gpu` / `-cpu` base, the latter being what the bare
# `-py311` tag points to, and PyTorch's CUDA or CPU index), TORCH_CUDA (the CUDA index, cu130: its
# wheels bring their own CUDA runtime and need an NVIDIA driver that supports it), TORCH_INDEX_URL
# (overrides the index, e.g. a mirror). The image tag carries the project's version (pyproject.toml).
#
# No docker daemon was available where this file was written, so it has never been built. Its
# steps are tested without one (tests/jobs/test_dockerfile.py): the base tag and the Ray pin against
# rayjob.yaml and pyproject.toml; the torch step's shell run for each VARIANT with pip replaced by a
# recorder; the files the COPY lines take (after .dockerignore) assembled into a directory, built
# into a wheel whose Requires-Dist and contents are checked and whose `python -m jobs.annotate` runs,
# and the project step's own pip command (less its ray pin, checked against pyproject.toml) run on
# it as an offline dry run. Pulling the base image and CUDA torch's download are not tested.
ARG RAY_VERSION=2.60.0
ARG PYTHON_VERSION=py311
ARG VARIANT=gpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_VERSION}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_CUDA=cu130
ARG TORCH_INDEX_URL=

LABEL org.opencontainers.image.title="sam-annotate" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Segment Anything pseudo-labelling on Ray Data (sam-annotate)"

# torch first, from PyTorch's index (unpinned: the newest build for that CUDA), so that the
# project's `torch>=2.1` is already met and pip never pulls PyPI's torch in its place.
RUN set -eu; \
    case "$VARIANT" in \
      gpu) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
      cpu) index="https://download.pytorch.org/whl/cpu" ;; \
      *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    pip install --no-cache-dir torch --index-url "${TORCH_INDEX_URL:-$index}"

# The project's sources: what `pip install .` needs, nothing else (tests, docs, bench stay out).
# Each directory by itself: `COPY a b dest/` would copy the contents of a and b, not a/ and b/.
# --chown: pip builds in the source tree (egg-info, build/) as Ray's user.
WORKDIR /home/ray
COPY --chown=ray:users pyproject.toml README.md sam-annotate/
COPY --chown=ray:users sam_core sam-annotate/sam_core
COPY --chown=ray:users pipeline sam-annotate/pipeline
COPY --chown=ray:users jobs sam-annotate/jobs

# The project without its test extra; ray pinned to the base image's own version (with the
# dashboard that `ray job submit` and KubeRay talk to) so that pip keeps Ray as it is. The working
# directory stays Ray's home, where `python -m jobs.annotate` imports the installed package.
RUN pip install --no-cache-dir ./sam-annotate "ray[default,data]==${RAY_VERSION}"
