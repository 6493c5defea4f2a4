"""The Python driver: runs a compiled MobileVLM library on its dist folder.

`Engine` owns the VM, the weights and one paged KV cache; each `ChatSession` is a sequence in that
cache, so a multi-turn chat feeds only its new tokens. Like MLC's `debug_chat.py`, it calls the
library's entry points directly (`embed`, `image_embed`, `prefill`, `decode`). The library takes one
sequence per call (no batched kernels), so several sequences share the cache by interleaved calls
(`Engine.generate_batch`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from PIL import Image
from tvm import relax
from tvm.runtime import ShapeTuple

from .artifact import check_shared_library, host_machine, inspect_library
from .conversation import IMAGE_TOKEN_ID, Conversation, tokenize_with_images
from .dist import TOKENIZER_MODEL, load_dist
from .errors import MobileVLMError, first_line
from .manifest import check_library
from .preprocess import load_image, preprocess
from .remote import RemoteSession
from .sampling import GenerationConfig, Sampler
from .tensor_cache import load_tensor_cache
from .tokenizer import StreamDecoder, Tokenizer

PAGE_SIZE = 16


DEVICE_KINDS = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")


def parse_device(name: str) -> tuple[str, int]:
    """'cpu', 'cuda:1', ... -> (kind, index); anything else is a MobileVLMError."""
    kind, _, index = name.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise MobileVLMError(f"device {name!r}: expected one of {', '.join(DEVICE_KINDS)}, optionally with ':INDEX'")
    return kind, int(index or 0)


def open_device(name: str, remote: RemoteSession | None = None) -> tvm.runtime.Device:
    """The device a library runs on, here or on the RPC device; refused when it is not there."""
    kind, index = parse_device(name)
    device = remote.device(kind, index) if remote else tvm.device(kind, index)
    if not remote and not device.exist:
        raise MobileVLMError(f"device {name!r} is not present on this machine")
    return device


def _pages(tokens: int) -> int:
    """KV cache pages that `tokens` tokens of one sequence occupy."""
    return -(-tokens // PAGE_SIZE)


@dataclass
class TurnResult:
    """What one chat turn fed and produced (the CLI's `--output-json`)."""

    prompt_token_ids: list[int]  # what this turn prefilled (after a drop: the kept history, then the message)
    output_token_ids: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None
    finish_reason: str = ""
    dropped_turns: int = 0  # oldest turns dropped to fit the context window before this one


@dataclass
class _Turn:
    """One exchange of a chat, kept so that the history can be re-prefilled after dropping older turns."""

    message: str
    image: np.ndarray | None  # its image tokens [n, hidden], if it had an image
    output_token_ids: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, dist_dir: Path, lib_path: Path, device: str = "cpu", max_sequences: int = 4,
                 kv_cache_tokens: int | None = None, remote: RemoteSession | None = None,
                 context_window_size: int | None = None):
        """`kv_cache_tokens` bounds the tokens of all live sequences together (default: one context window).
        `context_window_size` caps one conversation below the library's window (less memory, earlier
        dropping of old turns). With `remote`, the library runs on that RPC device (uploaded there;
        weights copied over). The library must have been compiled from this dist (its manifest)."""
        self.dist = load_dist(dist_dir)
        lib_path = Path(lib_path)
        if not lib_path.is_file():
            raise MobileVLMError(f"{lib_path}: compiled library not found (build it with `mobilevlm-mlc compile`)")
        check_shared_library(lib_path, None if remote else host_machine())
        device_code = {module.kind for module in inspect_library(lib_path).device_modules}
        kind = parse_device(device)[0]
        if device_code and kind not in device_code or not device_code and kind != "cpu":
            holds = f"{', '.join(sorted(device_code))} device code" if device_code else "CPU code only"
            raise MobileVLMError(f"{lib_path}: holds {holds}, but the device is {device!r}; run it with the matching "
                                 "--device (on a machine that has it), or compile for that device's target")
        self.remote = remote
        self._entries: dict[str, object] = {}
        self.device = open_device(device, remote)
        try:
            module = remote.load_library(lib_path) if remote else tvm.runtime.load_module(str(lib_path))
            self.vm = relax.VirtualMachine(module, self.device)
            self.metadata = json.loads(self._entry("_metadata")())
        except Exception as err:  # noqa: BLE001 - any loader failure means an unusable file
            raise MobileVLMError(f"{lib_path}: not a loadable mobilevlm-mlc library ({first_line(err)}); "
                                 "compile it again with this mobilevlm-mlc and TVM") from None
        check_library(self.dist, lib_path, self.metadata)
        library_window = int(self.metadata["context_window_size"])
        if context_window_size is not None and not 0 < context_window_size <= library_window:
            raise MobileVLMError(f"context_window_size is {context_window_size}, expected 1..{library_window} (the library's)")
        self.context_window_size = context_window_size or library_window
        self.params = self._load_params()
        if remote:  # RPC carries no Python lists: build the parameter array on the device's side,
            # keeping our handles alive (freeing a remote tensor's handle frees it under the array)
            self._param_handles = self.params
            self.params = remote.function("ffi.Array")(*self.params)
        self.tokenizer = Tokenizer(self.dist.path / TOKENIZER_MODEL)
        self.prefill_chunk_size = int(self.metadata["prefill_chunk_size"])
        self.hidden_size = int(self.metadata["hidden_size"])
        # the library's quantized matmuls round activations to int8 (its build record, `targets/cpu.py`)
        self.int8_activations = self.metadata["build"].get("quantized_matmul_activations") == "int8"
        self.kv_cache = self._entry("create_tir_paged_kv_cache")(
            self._shape(max_sequences), self._shape(kv_cache_tokens or self.context_window_size),
            self._shape(self.prefill_chunk_size), self._shape(PAGE_SIZE), self._shape(0),
        )
        self._next_seq_id = 0
        self.stop_token_ids = set(self.dist.chat_config["conv_template"]["stop_token_ids"])

    def _entry(self, name: str):
        """An entry point of the library, looked up once (over RPC each lookup is a round trip)."""
        if name not in self._entries:
            self._entries[name] = self.vm[name]
        return self._entries[name]

    def _shape(self, *dims: int):
        """A shape argument; made where the library runs (RPC cannot carry shape objects)."""
        return self.remote.function("ffi.Shape")(*dims) if self.remote else ShapeTuple(dims)

    def _pair(self, result):
        """(logits, kv cache) from an entry point's tuple; over RPC the tuple stays remote."""
        if not self.remote:
            return result
        get = self.remote.function("ffi.ArrayGetItem")
        return get(result, 0), get(result, 1)

    def _builtin(self, name: str):
        """A `vm.builtin.*` function (KV cache, reshape) where the library runs."""
        full = f"vm.builtin.{name}"
        return self.remote.function(full) if self.remote else tvm.get_global_func(full)

    def _load_params(self) -> list[tvm.runtime.Tensor]:
        """The weights in the library's parameter order, refused unless names, shapes and dtypes all match."""
        loaded = load_tensor_cache(self.dist.path, self.device)
        problems, params = [], []
        if self.metadata["quantization"] != self.dist.quantization.name:
            problems.append(f"library built for {self.metadata['quantization']}, weights are {self.dist.quantization.name}")
        for spec in self.metadata["params"]:
            name = spec["name"]
            tensor = loaded.get(name)
            if tensor is None:
                problems.append(f"{name} missing")
            elif list(tensor.shape) != spec["shape"] or str(tensor.dtype) != spec["dtype"]:
                problems.append(f"{name} is {list(tensor.shape)} {tensor.dtype}, library expects {spec['shape']} {spec['dtype']}")
            params.append(tensor)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise MobileVLMError(f"{self.dist.path}: weights do not match the library: {'; '.join(problems[:3])}{more}")
        return params

    # ---- model boundaries -------------------------------------------------------------------------

    def pixels(self, image: Image.Image | Path | str) -> np.ndarray:
        image = image if isinstance(image, Image.Image) else load_image(Path(image))
        return preprocess(image, self.dist.config.image_processor, self.dist.config.dtype)

    def vision_features(self, pixels: np.ndarray) -> np.ndarray:
        return self._entry("vision_features")(tvm.runtime.tensor(pixels, self.device), self.params).numpy()

    def image_embed(self, pixels: np.ndarray) -> np.ndarray:
        return self._entry("image_embed")(tvm.runtime.tensor(pixels, self.device), self.params).numpy()

    def embed(self, ids: list[int]) -> np.ndarray:
        ids_array = np.asarray(ids, np.int32)
        vocab = int(self.metadata["vocab_size"])
        if ids_array.size and (ids_array.min() < 0 or ids_array.max() >= vocab):  # the gather does no bounds check
            raise MobileVLMError(f"token ids must lie in [0, {vocab}), found {ids_array.min()}..{ids_array.max()}")
        return self._entry("embed")(tvm.runtime.tensor(ids_array, self.device), self.params).numpy()

    def input_embeds(self, ids: list[int], image_embeds: list[np.ndarray]) -> np.ndarray:
        """Text embeddings with each `IMAGE_TOKEN_ID` replaced by the next image's tokens: [n, hidden]."""
        positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID]
        if len(positions) != len(image_embeds):
            raise MobileVLMError(f"the prompt has {len(positions)} <image> placeholder(s) but {len(image_embeds)} image(s) were given")
        parts, start = [], 0
        for pos, image in zip(positions + [len(ids)], image_embeds + [None]):
            if pos > start:
                parts.append(self.embed(ids[start:pos]))
            if image is not None:
                parts.append(image)
            start = pos + 1
        return np.concatenate(parts)

    # ---- sequences in the KV cache -----------------------------------------------------------------

    def free_kv_tokens(self) -> int:
        return int(self._builtin("attention_kv_cache_get_num_available_pages")(self.kv_cache)) * PAGE_SIZE

    def add_sequence(self) -> int:
        seq_id, self._next_seq_id = self._next_seq_id, self._next_seq_id + 1
        self._builtin("kv_state_add_sequence")(self.kv_cache, seq_id)
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self._builtin("kv_state_remove_sequence")(self.kv_cache, seq_id)

    def release_workspace(self) -> None:
        """Free the VM's pooled buffers that are not in use. The pooled allocator keeps a buffer for every
        size it ever served, so each long prefill of a new length (a re-prefilled chat history) would
        otherwise stay resident for good."""
        self._builtin("memory_manager.clear")()

    def prefill(self, seq_id: int, embeds: np.ndarray) -> np.ndarray:
        """Feed [n, hidden] embeddings in chunks of `prefill_chunk_size`; logits of the last position."""
        for start in range(0, len(embeds), self.prefill_chunk_size):
            chunk = embeds[start : start + self.prefill_chunk_size]
            self._builtin("kv_state_begin_forward")(self.kv_cache, self._shape(seq_id), self._shape(len(chunk)))
            logits, self.kv_cache = self._pair(self._entry("prefill")(tvm.runtime.tensor(chunk[None], self.device), self.kv_cache, self.params))
            self._builtin("kv_state_end_forward")(self.kv_cache)
        return logits.numpy()[0, -1]

    def decode(self, seq_id: int, token: int) -> np.ndarray:
        embed = self._entry("embed")(tvm.runtime.tensor(np.asarray([token], np.int32), self.device), self.params)
        embed = self._builtin("reshape")(embed, self._shape(1, 1, self.hidden_size))
        self._builtin("kv_state_begin_forward")(self.kv_cache, self._shape(seq_id), self._shape(1))
        logits, self.kv_cache = self._pair(self._entry("decode")(embed, self.kv_cache, self.params))
        self._builtin("kv_state_end_forward")(self.kv_cache)
        return logits.numpy()[0, -1]

    def teacher_forced_logits(self, ids: list[int], images: list[np.ndarray], tokens: list[int]) -> np.ndarray:
        """float32 logits [len(tokens), vocab]: after the prompt `ids`, then after each of `tokens[:-1]` (decode steps)."""
        seq_id = self.add_sequence()
        try:
            steps = [self.prefill(seq_id, self.input_embeds(ids, images))]
            steps += [self.decode(seq_id, token) for token in tokens[:-1]]
        finally:
            self.remove_sequence(seq_id)
        return np.stack(steps)

    def chat(self) -> ChatSession:
        return ChatSession(self)

    def generate(self, prompt: str, image: Image.Image | Path | str | None = None, config: GenerationConfig | None = None) -> Iterator[str]:
        """One-turn convenience: stream the answer to `prompt` about `image`."""
        with self.chat() as session:
            yield from session.send(prompt, image, config)

    def generate_batch(self, prompts: list[str], images: list[Image.Image | Path | str | None] | None = None,
                       config: GenerationConfig | None = None) -> list[TurnResult]:
        """Answer several prompts together: one sequence each in the shared paged KV cache, prefilled in
        turn, then decoded one token per live sequence per round (interleaved single-sequence calls: the
        library has no batched entry points). Each answer is what its prompt gives alone."""
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise MobileVLMError(f"generate_batch got {len(prompts)} prompts but {len(images)} images (use None for none)")
        sessions: list[ChatSession] = []
        try:
            for _ in prompts:
                sessions.append(self.chat())
            live = [s.send_tokens(p, im, config) for s, p, im in zip(sessions, prompts, images)]
            while live:
                live = [stream for stream in live if next(stream, None) is not None]
            return [s.last for s in sessions]
        finally:
            for session in sessions:
                session.close()


class ChatSession:
    """A conversation in the `v1` template; each turn prefills only the new tokens.

    At the context window it drops its oldest turns, as chat apps do: when a turn's prompt plus
    `min(max_new_tokens, window // 4)` answer tokens would not fit after what the session holds, the
    oldest turns (with their images) go until the rest, re-rendered from the system prompt, and the new
    message fill at most half the window; that history is re-prefilled in a fresh sequence
    (`TurnResult.dropped_turns` says how many went). A message that alone does not fit the window is
    refused with a MobileVLMError, and the session is left as it was.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.seq_id = engine.add_sequence()
        self.template = dict(engine.dist.chat_config["conv_template"])
        self.turns: list[_Turn] = []  # the history the KV cache holds (the oldest may have been dropped)
        self.length = 0  # tokens in the KV cache
        self.pending: list[int] = []  # generated but not yet fed (the turn ended on max_new_tokens)
        self.last: TurnResult | None = None

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        if self.seq_id is not None:
            self.engine.remove_sequence(self.seq_id)
            self.seq_id = None
            self.turns = []

    def _turn_ids(self, turn: _Turn, first: bool) -> list[int]:
        """`turn` rendered as the conversation's first turn (BOS, system prompt) or a later one, with its answer."""
        text = Conversation(template=self.template, turns=0 if first else 1).user_turn(turn.message, with_image=turn.image is not None)
        return tokenize_with_images(self.engine.tokenizer, text, add_bos=first) + turn.output_token_ids

    def _size(self, turn: _Turn, first: bool, ids: list[int] | None = None) -> int:
        """Tokens `turn` takes in the KV cache (its image counts as its image tokens); pass its `ids`
        when already tokenized."""
        ids = self._turn_ids(turn, first) if ids is None else ids
        return len(ids) + (len(turn.image) - 1 if turn.image is not None else 0)

    def _turns_to_drop(self, turn: _Turn) -> int:
        """How many of the oldest turns must go for the rest plus `turn` to fill at most half the window."""
        budget = self.engine.context_window_size // 2
        later = [self._size(t, first=False) for t in self.turns[1:]] + [self._size(turn, first=False)]
        for start, kept in enumerate(self.turns):
            if self._size(kept, first=True) + sum(later[start:]) <= budget:
                return start
        return len(self.turns)

    def send(self, message: str, image: Image.Image | Path | str | None = None, config: GenerationConfig | None = None) -> Iterator[str]:
        """Stream the answer to `message` (and `image`, if given) as text deltas."""
        return (delta for delta in self.send_tokens(message, image, config) if delta)

    def send_tokens(self, message: str, image: Image.Image | Path | str | None = None, config: GenerationConfig | None = None) -> Iterator[str]:
        """Like `send`, but yields once per generated token (its text delta, possibly empty), so that
        callers can advance several sessions a token at a time."""
        engine, config = self.engine, config or GenerationConfig()
        window = engine.context_window_size
        turn = _Turn(message, engine.image_embed(engine.pixels(image)) if image is not None else None)
        turn_ids = self._turn_ids(turn, first=not self.turns)
        ids = self.pending + turn_ids
        size = len(self.pending) + self._size(turn, first=not self.turns, ids=turn_ids)
        rerender = bool(self.turns) and self.length + size + min(config.max_new_tokens, window // 4) > window
        dropped = self._turns_to_drop(turn) if rerender else 0
        if rerender:
            history = self.turns[dropped:] + [turn]
            ids = [i for k, t in enumerate(history) for i in self._turn_ids(t, first=k == 0)]
            size = sum(self._size(t, first=k == 0) for k, t in enumerate(history))
        if size >= window:
            raise MobileVLMError(f"prompt of {size} tokens (with image tokens) does not fit the context window of {window} tokens")
        start = 0 if rerender else self.length  # a re-prefill gives this sequence's pages back first
        pages = _pages(start + size) - _pages(start) - (_pages(self.length) if rerender else 0)
        if pages * PAGE_SIZE > engine.free_kv_tokens():
            raise MobileVLMError(f"prompt of {size} tokens does not fit the KV cache: {engine.free_kv_tokens()} tokens free (close other chat sessions)")
        if rerender:  # the kept history goes into a fresh sequence
            engine.remove_sequence(self.seq_id)
            self.seq_id, self.length, self.turns = engine.add_sequence(), 0, self.turns[dropped:]
        images = [t.image for t in (self.turns if rerender else []) + [turn] if t.image is not None]
        embeds = engine.input_embeds(ids, images)
        self.pending = []
        result = self.last = TurnResult(prompt_token_ids=list(ids), output_token_ids=turn.output_token_ids, dropped_turns=dropped)
        logits = engine.prefill(self.seq_id, embeds)
        if rerender:
            engine.release_workspace()
        self.length += len(embeds)
        self.turns.append(turn)
        result.first_logits = logits
        sampler, stream = Sampler(config), StreamDecoder(engine.tokenizer)
        while True:
            token = sampler(logits)
            if token in engine.stop_token_ids:
                result.finish_reason = "stop"
                return
            turn.output_token_ids.append(token)
            self.pending = [token]  # until it is fed (a caller may stop iterating at the yield)
            yield stream.push(token)
            out_of_pages = self.length % PAGE_SIZE == 0 and engine.free_kv_tokens() == 0  # shared with other sessions
            if len(turn.output_token_ids) >= config.max_new_tokens or self.length + 1 >= window or out_of_pages:
                result.finish_reason = "length"
                return
            logits = engine.decode(self.seq_id, token)
            self.pending = []
            self.length += 1
