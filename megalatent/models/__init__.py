"""Model families. Importing this package registers every family in `registry.MODEL_FAMILIES`."""
from megalatent.models import registry  # noqa: F401
from megalatent.models import decoder  # noqa: F401  (registers "gpt")
from megalatent.models import longnet  # noqa: F401  (registers "longnet")
from megalatent.models import longvit  # noqa: F401  (registers "longvit")
from megalatent.models import bitnet  # noqa: F401  (registers "bitnet")
from megalatent.models import latentlm  # noqa: F401  (registers "latentlm")
from megalatent.models import yoco  # noqa: F401  (registers "yoco")
