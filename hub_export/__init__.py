"""hub_export: publish the model zoo as Hugging Face Hub model repos, one per variant, with model cards.

``python -m hub_export push CKPT_DIR --repo-id ORG/NAME`` and ``python -m hub_export push-zoo ZOO_DIR
--org ORG``; ``--dry-run DIR`` writes what would be uploaded. The repos load back with
``surgery.load_variant("ORG/NAME")``.

Example:
    >>> from hub_export import push_zoo
    >>> push_zoo("zoo/resnet18-shapes", "my-org")   # my-org/resnet18-shapes-fp32, -int8, -int4, ..., -sparse98
"""

from hub_export.card import model_card
from hub_export.push import UPLOAD_FILES, PushError, Upload, push, push_variant, push_zoo, stage, zoo_uploads

__all__ = ["UPLOAD_FILES", "PushError", "Upload", "model_card", "push", "push_variant", "push_zoo", "stage",
           "zoo_uploads"]
