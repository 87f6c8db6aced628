"""Loads protege's exports with transformers / peft and writes their logits.

Usage:
    python3 tools/check_exports.py --base MODEL_DIR [--adapter ADAPTER_DIR] [--full HF_DIR]
        --ids-from REFERENCE.safetensors --out-dir DIR

--adapter: the PEFT adapter protege wrote (`adapter_config.json` + `adapter_model.safetensors`)
is loaded onto MODEL_DIR with `peft.PeftModel.from_pretrained`; its logits go to
DIR/peft_logits.safetensors. --full: the HF directory protege wrote is loaded with
`AutoModelForCausalLM.from_pretrained`; its logits go to DIR/full_logits.safetensors. Both use
the input ids of REFERENCE.safetensors and are in the check-logits format, so
`protege check-logits` (or the tests) compare them with protege's own logits. Everything is
float32, eager attention. Re-executes itself inside the pinned venv (refenv.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refenv import ensure_venv  # noqa: E402

ensure_venv()

import torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from make_reference import load_model, prefill_logits, write_logits  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--full", type=Path)
    ap.add_argument("--ids-from", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    a = ap.parse_args()
    ids = [int(i) for i in load_file(str(a.ids_from))["input_ids"]]
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
