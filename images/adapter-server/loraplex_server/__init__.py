"""loraplex adapter-switching server: the process that runs beside vLLM in every pod.

It imports nothing from the operator or kopf, so its image stays small; the operator imports
:mod:`loraplex_server.manifest` to write the documents this server reads.
"""

__version__ = "0.1.0"
