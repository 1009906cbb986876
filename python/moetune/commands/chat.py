"""`moetune chat`: generation with a model (+ adapter), one-shot (--prompt) or interactive.

One-shot: each --prompt is answered on its own (a single user turn, the tokenizer's chat template
when it has one). Interactive (no --prompt): a conversation on stdin; the history grows turn by
turn; `/reset` clears it, `/exit` or end of input quits. Greedy unless --temperature > 0.
"""

from __future__ import annotations

import sys

from moetune.commands.common import add_model_args, load


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="generate with a model (+ adapter): one-shot with --prompt, else an interactive chat",
        description="Generation with the experts on the moetune engine. With --prompt: answer each prompt "
        "and exit; without: chat on stdin (/reset clears the history, /exit quits).",
    )
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a user message to answer (repeatable)")
    p.add_argument("--system", help="system message (chat-template models)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per answer (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def _encode(tok, messages):
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    # No template (a base model): the turns as plain text, the last one continued.
    return tok("\n".join(m["content"] for m in messages))["input_ids"]


def answer(model, tok, device, messages, args) -> str:
    """The model's reply to `messages` (a chat history ending in a user turn)."""
    import torch

    ids = torch.tensor([_encode(tok, messages)], device=device)
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kw.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def run(args) -> int:
    from moetune.commands.common import UsageError

    if args.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    model, tok, device, _ = load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        for p in args.prompt:
            print(answer(model, tok, device, [*system, {"role": "user", "content": p}], args), flush=True)
        return 0
    history = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": text})
        reply = answer(model, tok, device, history, args)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
