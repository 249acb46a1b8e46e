"""`hpi`: run the anchor server, and build or inspect `.holo` files.

Heavy imports (torch, transformers) happen inside the commands, so `--help` and
`holo inspect` stay quick.
"""

import argparse
import json
import sys
from pathlib import Path

from hpi.protocol.holo import ENTRY_HEAD, ENTRY_TAIL, ENTRY_TYPE, FLAG_DEFLATE, HEADER, HoloError, load_hologram


class CommandError(Exception):
    """A user-facing failure: printed as `hpi: error: ...`, exit code 2."""


def settings_from(args: argparse.Namespace, *fields: str):
    """Settings from HPI_* env, overridden by the flags among `fields` that the user gave."""
    from hpi.config import Settings

    return Settings(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})


def load_lm(name: str, device: str):
    from hpi.models import ModelError, load_model

    try:
        return load_model(name, device)
    except ModelError as e:
        raise CommandError(str(e)) from None


def check_codec(name: str) -> None:
    from hpi.spectral import PRESETS

    if name not in PRESETS:
        raise CommandError(f"unknown codec preset {name!r}; known: {', '.join(PRESETS)}")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from hpi.app import create_app
    from hpi.models import ModelError, resolve_model_path
    from hpi.serving import server_options

    settings = settings_from(args, "model", "resonator_model", "host", "port", "codec")
    check_codec(settings.codec)
    try:  # fail fast on a bad path; the app loads the models at startup
        resolve_model_path(settings.model)
        if settings.resonator_model:
            resolve_model_path(settings.resonator_model)
    except ModelError as e:
        raise CommandError(str(e)) from None
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **server_options())


def stored_entries(data: bytes) -> list[tuple[int, int]]:
    """(stored bytes, flags) of each tensor, in directory order, of an already validated file."""
    _, _, _, meta_len, n_tensors, _, _ = HEADER.unpack_from(data, 0)
    pos, out = HEADER.size + meta_len, []
    for _ in range(n_tensors):
        (name_len,) = ENTRY_HEAD.unpack_from(data, pos)
        pos += ENTRY_HEAD.size + name_len
        _, ndim, flags, _ = ENTRY_TYPE.unpack_from(data, pos)
        pos += ENTRY_TYPE.size + 4 * ndim
        _, nbytes = ENTRY_TAIL.unpack_from(data, pos)
        pos += ENTRY_TAIL.size
        out.append((nbytes, flags))
    return out


def cmd_holo_inspect(args: argparse.Namespace) -> None:
    try:
        data = Path(args.file).read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read {args.file}: {e.strerror}") from None
    try:
        holo = load_hologram(data)
    except HoloError as e:
        raise CommandError(f"{args.file}: {e}") from None
    print(f"file: {args.file} ({len(data)} bytes)")
    print(f"kind: {holo.kind}")
    print("meta:")
    print(json.dumps(holo.meta, indent=2, sort_keys=True))
    rows = [("name", "dtype", "shape", "stored bytes", "deflated")]
    for (name, arr), (nbytes, flags) in zip(holo.tensors.items(), stored_entries(data)):
        rows.append((name, str(arr.dtype), "x".join(map(str, arr.shape)) or "scalar", str(nbytes),
                     "yes" if flags & FLAG_DEFLATE else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"tensors: {len(holo.tensors)}")
    for r in rows:
        print("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())


def cmd_holo_build(args: argparse.Namespace) -> None:
    from hpi.anchor import Anchor, Caches
    from hpi.llama import head_dim

    settings = settings_from(args, "model", "codec")
    check_codec(settings.codec)
    lm = load_lm(settings.model, settings.device)
    anchor = Anchor(lm, **settings.anchor_options())
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    caches = Caches()
    anchor.prefill(caches, lm.chat_ids(messages))
    data = anchor.hologram_bytes(caches, 0)
    Path(args.out).write_bytes(data)
    c = lm.config
    positions = len(caches.ids) - 1  # the last token is left for the resonator's first step
    fp16 = positions * 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * 2
    print(f"wrote {args.out}: {len(data)} bytes, {len(caches.ids)} tokens ({positions} KV positions); "
          f"fp16 KV {fp16} bytes, ratio {fp16 / len(data):.2f}x")


def cmd_pack_build(args: argparse.Namespace) -> None:
    from hpi.anchor import Anchor

    settings = settings_from(args, "model")
    anchor = Anchor(load_lm(settings.model, settings.device), **settings.anchor_options())
    Path(args.out).write_bytes(anchor.pack_bytes)
    print(f"wrote {args.out}: {len(anchor.pack_bytes)} bytes, model_key {anchor.model_key}, "
          f"sha256 {anchor.pack_hash}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpi", description="Holographic Perturbation Inference")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = "'default', an HF folder or a .gguf file (default: $HPI_MODEL or 'default')"

    s = sub.add_parser("serve", help="run the anchor HTTP server",
                       description="Run the anchor server. Flags override the HPI_* environment.")
    s.add_argument("--model", help=f"anchor model: {model_help}")
    s.add_argument("--resonator-model", dest="resonator_model",
                   help="model the browser runs (same tokenizer); default: the anchor model")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--codec", help="codec preset: default, fine or coarse")
    s.set_defaults(func=cmd_serve)

    holo = sub.add_parser("holo", help="build or inspect .holo files").add_subparsers(dest="holo_command",
                                                                                      required=True)
    i = holo.add_parser("inspect", help="print a .holo file's kind, metadata and tensors")
    i.add_argument("file")
    i.set_defaults(func=cmd_holo_inspect)
    b = holo.add_parser("build", help="prefill a chat prompt and write its conversation hologram")
    b.add_argument("--prompt", required=True, help="the user message")
    b.add_argument("--system", help="an optional system message")
    b.add_argument("--model", help=model_help)
    b.add_argument("--codec", help="codec preset: default, fine or coarse")
    b.add_argument("--out", default="conversation.holo", help="output file (default conversation.holo)")
    b.set_defaults(func=cmd_holo_build)

    pk = sub.add_parser("pack", help="build model packs").add_subparsers(dest="pack_command", required=True)
    pb = pk.add_parser("build", help="write the model pack the browser downloads")
    pb.add_argument("--model", help=model_help)
    pb.add_argument("--out", required=True, help="output file")
    pb.set_defaults(func=cmd_pack_build)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        args.func(args)
    except CommandError as e:
        print(f"hpi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
