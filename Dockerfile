# The stream-ml image: every stream-ml service of docker-compose.yml runs it with its own command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in a layer of its own: the largest dependency is not reinstalled when the code changes.
RUN pip install torch==2.13.0

WORKDIR /src
COPY . .
RUN pip install .

RUN useradd --create-home --uid 10001 streamml \
    # A named volume mounted here takes this folder's owner: the workers must be able to register models.
    && mkdir /registry && chown streamml /registry
USER streamml
WORKDIR /home/streamml

# No ENTRYPOINT: each service gives the whole command, e.g. ["stream-ml", "stack", "up"].
CMD ["stream-ml", "--help"]
