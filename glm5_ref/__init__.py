"""glm5-ref: a readable, tested reference implementation of GLM-5 (arXiv 2602.15763).

Start with notebooks/00_glm5_at_a_glance.ipynb; each module here is one component of the model.
"""

from glm5_ref.config import GLM5Config

__all__ = ["GLM5Config", "load_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``glm5_ref.load_pretrained("classroom-base")`` -> (model, tokenizer), imported on first use (pretrained.py),
    so that ``import glm5_ref`` stays light."""
    if name == "load_pretrained":
        from glm5_ref.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'glm5_ref' has no attribute {name!r}")
