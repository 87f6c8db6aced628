"""Loads protege's exports with transformers / peft and writes their logits.

Usage:
    python3 tools/check_exports.py --base MODEL_DIR [--adapter ADAPTER_DIR] [--full HF_DIR]
        --ids-from REFERENCE.safetensors --out-dir DIR
    python3 tools/check_exports.py --base MODEL_DIR --make-adapter ADAPTER_DIR [--seed S]
    python3 tools/check_exports.py --base MODEL_DIR --adapter ADAPTER_DIR --merged MERGED_DIR
        --ids-from REFERENCE.safetensors [--max-shard-size 100KB]

--adapter: the PEFT adapter protege wrote (`adapter_config.json` + `adapter_model.safetensors`)
is loaded onto MODEL_DIR with `peft.PeftModel.from_pretrained` (trained token rows, PEFT's
`trainable_token_indices`, included); its logits go to DIR/peft_logits.safetensors. --full:
the HF directory protege wrote is loaded with `AutoModelForCausalLM.from_pretrained`; its
logits go to DIR/full_logits.safetensors. Both use the input ids of REFERENCE.safetensors and
are in the check-logits format, so
`protege check-logits` (or the tests) compare them with protege's own logits. Everything is
float32, eager attention.

--make-adapter: writes a random PEFT LoRA adapter for MODEL_DIR with peft itself (rsLoRA,
target_modules "all-linear", r 8, lora_alpha 16, non-zero lora_B), a real peft
adapter_config.json for protege's --adapter and `export --merge` to read.

--merged: the directory `protege export --model MODEL_DIR --adapter ADAPTER_DIR --merge` wrote
is loaded with `AutoModelForCausalLM.from_pretrained` in its own dtype (config.json's) and
compared with peft's `PeftModel.from_pretrained(base, adapter).merge_and_unload()` in that
dtype: every weight, and the logits on the reference's input ids. It also checks that
`save_pretrained` of peft's merge (at --max-shard-size) writes the same tensor names (tied
embeddings: no lm_head.weight) and the same shard files. Prints one JSON object.

Re-executes itself inside the pinned venv (refenv.py).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refenv import ensure_venv  # noqa: E402

ensure_venv()

import torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from make_reference import load_model, prefill_logits, write_logits  # noqa: E402


def make_adapter(base, out, seed):
    """A random peft LoRA adapter on every linear module, rsLoRA, with non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False)
    model = get_peft_model(load_model(base), cfg)
    model.save_pretrained(str(out))
    print(f"peft: random adapter for {base} -> {out}")


def load_in(path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


def saved_layout(directory):
    """(tensor names, shard files) of a saved model directory."""
    index = Path(directory) / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(weight_map), sorted(set(weight_map.values()))
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "model.safetensors"), "pt") as f:
        return sorted(f.keys()), ["model.safetensors"]


@torch.no_grad()
def compare_merged(base, adapter, merged, ids, max_shard_size):
    """protege's merged export against peft's merge_and_unload, in the export's dtype."""
    from peft import PeftModel

    config = json.loads((merged / "config.json").read_text())
    dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, dtype_name)
    reference = PeftModel.from_pretrained(load_in(base, dtype), str(adapter)).merge_and_unload()
    ours = load_in(merged, dtype)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert sorted(ref_state) == sorted(our_state), "different tensor names"
    weight_diff, differing, total = 0.0, 0, 0
    for name, r in ref_state.items():
        o = our_state[name]
        assert o.dtype == dtype, f"{name} is {o.dtype}, not {dtype}"
        d = (o.float() - r.float()).abs()
        weight_diff = max(weight_diff, d.max().item())
        differing += int((d > 0).sum())
        total += d.numel()
    x = torch.tensor([ids])
    ref_logits, our_logits = reference(x).logits[0].float(), ours(x).logits[0].float()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp, max_shard_size=max_shard_size)
        hf_names, hf_files = saved_layout(tmp)
    our_names, our_files = saved_layout(merged)
    return {
        "dtype": dtype_name,
        "weights_max_abs_diff": weight_diff,
        "weights_differing": f"{differing}/{total}",
        "logits_max_abs_diff": (our_logits - ref_logits).abs().max().item(),
        "logits_max_abs": ref_logits.abs().max().item(),
        "argmax_agreement": float((our_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "same_tensor_names_as_save_pretrained": hf_names == our_names,
        "save_pretrained_files": hf_files,
        "protege_files": our_files,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--full", type=Path)
    ap.add_argument("--make-adapter", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merged", type=Path)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--ids-from", type=Path)
    ap.add_argument("--out-dir", type=Path)
    a = ap.parse_args()
    if a.make_adapter:
        make_adapter(a.base, a.make_adapter, a.seed)
        return
    if not a.ids_from:
        ap.error("--ids-from is required")
    ids = [int(i) for i in load_file(str(a.ids_from))["input_ids"]]
    if a.merged:
        if not a.adapter:
            ap.error("--merged needs --adapter")
        print(json.dumps(compare_merged(a.base, a.adapter, a.merged, ids, a.max_shard_size), indent=2))
        return
    if not a.out_dir:
        ap.error("--out-dir is required")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(a.base), str(a.adapter))
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        write_logits(a.out_dir / "peft_logits.safetensors", ids, logits)
        print(f"peft: {len(ids)} tokens -> {a.out_dir / 'peft_logits.safetensors'}")
    if a.full:
        logits = prefill_logits(load_model(a.full), ids)
        write_logits(a.out_dir / "full_logits.safetensors", ids, logits)
        print(f"transformers: {len(ids)} tokens -> {a.out_dir / 'full_logits.safetensors'}")


if __name__ == "__main__":
    main()
