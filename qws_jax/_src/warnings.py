"""The library's own warning category (tests turn it into errors)."""


class QwsWarning(UserWarning):
  """A warning issued by qws_jax."""
