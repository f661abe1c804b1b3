# dcgmrelay container image.
#   docker build -t dcgmrelay:latest .
# Builder: compiles the Cython extensions and collects wheels of dcgmrelay and its dependencies.
FROM python:3.11-slim AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir --upgrade pip \
    && pip wheel --no-cache-dir . -w /wheels

# Runtime: only the wheels, no compiler.
FROM python:3.11-slim
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels dcgmrelay \
    && python -c "import dcgmrelay; assert dcgmrelay.implementation() == 'c', 'native core not built'" \
    && rm -rf /wheels \
    && groupadd --system --gid 65532 dcgmrelay \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin dcgmrelay \
    && mkdir -p /var/lib/dcgmrelay /etc/dcgmrelay \
    && chown 65532:65532 /var/lib/dcgmrelay
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 9500
ENTRYPOINT ["dcgmrelay"]
CMD ["run", "--config", "/etc/dcgmrelay/relay.yaml"]
