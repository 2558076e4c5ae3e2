"""Applications built on the glm5_ref components."""
