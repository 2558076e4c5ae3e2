"""glm5-ref: a readable, tested reference implementation of GLM-5 (arXiv 2602.15763).

Start with notebooks/00_glm5_at_a_glance.ipynb; each module here is one component of the model.
"""

from glm5_ref.config import GLM5Config

__all__ = ["GLM5Config"]
__version__ = "0.1.0"
