"""Private implementation of qws_jax. Import from `qws_jax`, not from here."""
