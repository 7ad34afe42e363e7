"""loraplex: a Kubernetes operator that serves many LoRA adapters on one vLLM base model."""

__version__ = "0.1.0"
API_GROUP = "loraplex.io"
API_VERSION = "v1alpha1"
