# Stand-in for python:3.12-slim: Debian's python3 with venv, as `python3` and `python`.
ARG BASE
FROM ${BASE}
RUN ln -sf /usr/bin/python3 /usr/local/bin/python
CMD ["python3"]
