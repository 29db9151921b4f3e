"""Frozen pathology foundation encoders by name (UNI, Virchow2, H-optimus, CONCH, cTransPath, ...).

    spec = get_encoder("uni")                    # architecture, input size, normalisation, pooling, hub file
    enc = load_encoder("uni", "weights/uni/model.safetensors", device="cuda")
    emb = enc.embed_uint8(patches)               # uint8 (N, H, W, 3) -> float32 (N, 1024)

Weights come from `cmrcnet.weights.fetch_weights(name, out_dir)` (hub) or `import_local_weights` (a local file),
both writing `model.safetensors` in build()'s key layout plus SOURCE.json.
"""

from cmrcnet.encoders import zoo  # noqa: F401 - registers the entries
from cmrcnet.encoders.frozen import (
    FrozenEncoder,
    check_state_dict,
    load_encoder,
    meta_state_dict,
    read_checkpoint,
    state_dict_problems,
)
from cmrcnet.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderSpec,
    HubFile,
    get_encoder,
    is_encoder,
    list_encoders,
    pool_cls_and_patch_mean,
    pool_last_feature_map_mean,
    pool_native,
    register_encoder,
    unregister_encoder,
    unwrap_state_dict,
)
from cmrcnet.encoders.zoo import write_tiny_test_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "EncoderSpec",
    "FrozenEncoder",
    "HubFile",
    "check_state_dict",
    "get_encoder",
    "is_encoder",
    "list_encoders",
    "load_encoder",
    "meta_state_dict",
    "pool_cls_and_patch_mean",
    "pool_last_feature_map_mean",
    "pool_native",
    "read_checkpoint",
    "register_encoder",
    "state_dict_problems",
    "unregister_encoder",
    "unwrap_state_dict",
    "write_tiny_test_weights",
]
