"""Peer baseline for W1: HF transformers `generate` on a random-weight
MistralForCausalLM of Mistral-7B's shapes in f16 (the same shapes runner
benches), batch B, 128 prompt tokens, 128 new tokens, greedy, no EOS stop.

    python3 benches/hf_peer.py --batch 256 --batches 1
Prints output tok/s. Needs torch + transformers + a GPU.
"""
import argparse, json, time
import torch
from transformers import MistralConfig, MistralForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--batches", type=int, default=1)
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--new", type=int, default=128)
a = ap.parse_args()
cfg = MistralConfig(vocab_size=32002, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                    sliding_window=4096, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cuda"):
    model = MistralForCausalLM._from_config(cfg, dtype=torch.float16, attn_implementation="sdpa")
model.eval()
gen = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
ids = torch.randint(100, 32000, (a.batch, a.prompt), device="cuda")
with torch.no_grad():
    model.generate(ids[:8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(a.batches):
        out = model.generate(ids, **gen)
    torch.cuda.synchronize()
    dt = time.time() - t
new = a.batches * a.batch * (out.shape[1] - a.prompt)
print(json.dumps({"peer": "transformers generate f16", "transformers": __import__("transformers").__version__,
                  "torch": torch.__version__, "batch": a.batch, "prompt": a.prompt, "new": a.new,
                  "output_tok_s": new / dt, "wall_s": dt,
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
