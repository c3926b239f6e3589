"""Serve an exported TAGI adapter with plain PEFT: no peft-tagi import, no instruction at inference.

peft-tagi generate-adapter "Reverse the order of the words." --model BASE --tagi CKPT --out my_task
python examples/serve_lora.py --model BASE --adapter my_task "cat dog sun"
"""

import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="the base model the adapter was generated for")
parser.add_argument("--adapter", required=True, help="folder (or Hub repo) of the exported LoRA")
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("inputs", nargs="*", help="task inputs; read from stdin, one per line, when none are given")
args = parser.parse_args()

config = AutoConfig.from_pretrained(args.model)
cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = PeftModel.from_pretrained(cls.from_pretrained(args.model), args.adapter).eval()
inputs = args.inputs or [line.strip() for line in sys.stdin if line.strip()]
batch = tokenizer(inputs, return_tensors="pt", padding=True)
with torch.no_grad():
    ids = model.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=1, do_sample=False)
if not config.is_encoder_decoder:
    ids = ids[:, batch["input_ids"].shape[1] :]
for text, output in zip(inputs, tokenizer.batch_decode(ids, skip_special_tokens=True)):
    print(f"{text}\t{output.strip()}")
