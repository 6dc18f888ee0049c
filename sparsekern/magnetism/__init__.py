"""Magnetism beside a foundation model: a magnetic energy E_mag(R, Z, m) added to the
model's energy (exactly the base model at the start), magnetic forces -dE/dm, a moment
head, self-consistent moments, and the fine-tuning family that trains them."""
