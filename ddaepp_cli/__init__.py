"""ddaepp: diffusion models as unified generative and discriminative learners (DDAE++, DDAE, SRA)."""

__version__ = "0.1.0"
