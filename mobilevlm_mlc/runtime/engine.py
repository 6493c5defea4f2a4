"""The Python driver: runs a compiled MobileVLM library on its dist folder.

`Engine` owns the VM, the weights and one paged KV cache; each `ChatSession` (`chat`) is a sequence in
that cache, so a multi-turn chat feeds only its new tokens. Like MLC's `debug_chat.py`, it calls the
library's entry points directly (`embed`, `image_embed`, `prefill`, `decode`), here or on an RPC device
(`backend`). The library takes one sequence per call (no batched kernels), so several sequences share
the cache by interleaved calls (`Engine.generate_batch`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from PIL import Image
from tvm import relax

from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.formats.dist import TOKENIZER_MODEL, load_dist
from mobilevlm_mlc.formats.library import check_shared_library, inspect_library
from mobilevlm_mlc.formats.manifest import check_library
from mobilevlm_mlc.formats.tensor_cache import load_tensor_cache

from .backend import Backend, LocalBackend, RemoteSession, parse_device
from .chat import ChatSession, TurnResult
from .conversation import IMAGE_TOKEN_ID
from .kv_cache import PagedKVCache
from .preprocess import load_image, preprocess
from .sampling import GenerationConfig
from .tokenizer import Tokenizer


class Engine:
    def __init__(
        self,
        dist_dir: Path,
        lib_path: Path,
        device: str = "cpu",
        max_sequences: int = 4,
        kv_cache_tokens: int | None = None,
        remote: RemoteSession | None = None,
        context_window_size: int | None = None,
    ):
        """`kv_cache_tokens` bounds the tokens of all live sequences together (default: one context window).
        `context_window_size` caps one conversation below the library's window (less memory, earlier
        dropping of old turns). With `remote`, the library runs on that RPC device (uploaded there;
        weights copied over). The library must have been compiled from this dist (its manifest)."""
        self.dist = load_dist(dist_dir)
        self.backend: Backend = remote or LocalBackend()
        lib_path = Path(lib_path)
        self.lib_path = lib_path
        self._check_library_file(lib_path, device)
        self._entries: dict[str, object] = {}
        self.device = self.backend.device(device)
        try:
            self.vm = relax.VirtualMachine(self.backend.load_library(lib_path), self.device)
            self.metadata = json.loads(self._entry("_metadata")())
        except Exception as err:  # noqa: BLE001 - any loader failure means an unusable file
            raise MobileVLMError(
                f"{lib_path}: not a loadable mobilevlm-mlc library ({first_line(err)}); "
                "compile it again with this mobilevlm-mlc and TVM"
            ) from None
        check_library(self.dist, lib_path, self.metadata)
        library_window = int(self.metadata["context_window_size"])
        if context_window_size is not None and not 0 < context_window_size <= library_window:
            raise MobileVLMError(
                f"context_window_size is {context_window_size}, expected 1..{library_window} (the library's)"
            )
        self.context_window_size = context_window_size or library_window
        self._param_tensors = self._load_params()  # alive as long as the array (over RPC: remote handles)
        self.params = self.backend.param_array(self._param_tensors)
        self.tokenizer = Tokenizer(self.dist.path / TOKENIZER_MODEL)
        self.prefill_chunk_size = int(self.metadata["prefill_chunk_size"])
        self.hidden_size = int(self.metadata["hidden_size"])
        # the library's quantized matmuls round activations to int8 (its build record, `targets/cpu.py`)
        self.int8_activations = self.metadata["build"].get("quantized_matmul_activations") == "int8"
        self.kv = PagedKVCache(
            self._entry("create_tir_paged_kv_cache"),
            self.backend,
            max_sequences,
            kv_cache_tokens or self.context_window_size,
            self.prefill_chunk_size,
        )
        self.stop_token_ids = set(self.dist.chat_config["conv_template"]["stop_token_ids"])

    def _check_library_file(self, lib_path: Path, device: str) -> None:
        """Refuse, before loading, a file that is no whole library for this machine or holds no code for `device`."""
        if not lib_path.is_file():
            raise MobileVLMError(f"{lib_path}: compiled library not found (build it with `mobilevlm-mlc compile`)")
        check_shared_library(lib_path, self.backend.machine)
        report = inspect_library(lib_path)
        self.functions = set(report.vm_functions)
        device_code = {module.kind for module in report.device_modules}
        kind = parse_device(device)[0]
        if device_code and kind not in device_code or not device_code and kind != "cpu":
            holds = f"{', '.join(sorted(device_code))} device code" if device_code else "CPU code only"
            raise MobileVLMError(
                f"{lib_path}: holds {holds}, but the device is {device!r}; run it with the matching "
                "--device (on a machine that has it), or compile for that device's target"
            )

    def _entry(self, name: str):
        """An entry point of the library, looked up once (over RPC each lookup is a round trip)."""
        if name not in self._entries:
            self._entries[name] = self.vm[name]
        return self._entries[name]

    def _load_params(self) -> list[tvm.runtime.Tensor]:
        """The weights in the library's parameter order, refused unless names, shapes and dtypes all match."""
        loaded = load_tensor_cache(self.dist.path, self.device)
        problems, params = [], []
        if self.metadata["quantization"] != self.dist.quantization.name:
            problems.append(
                f"library built for {self.metadata['quantization']}, weights are {self.dist.quantization.name}"
            )
        for spec in self.metadata["params"]:
            name = spec["name"]
            tensor = loaded.get(name)
            if tensor is None:
                problems.append(f"{name} missing")
            elif list(tensor.shape) != spec["shape"] or str(tensor.dtype) != spec["dtype"]:
                problems.append(
                    f"{name} is {list(tensor.shape)} {tensor.dtype}, library expects {spec['shape']} {spec['dtype']}"
                )
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
            raise MobileVLMError(
                f"the prompt has {len(positions)} <image> placeholder(s) but {len(image_embeds)} image(s) were given"
            )
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
        return self.kv.free_tokens()

    def add_sequence(self) -> int:
        return self.kv.add_sequence()

    def remove_sequence(self, seq_id: int) -> None:
        self.kv.remove_sequence(seq_id)

    def release_workspace(self) -> None:
        """Free the VM's pooled buffers that are not in use. The pooled allocator keeps a buffer for every
        size it ever served, so each long prefill of a new length (a re-prefilled chat history) would
        otherwise stay resident for good."""
        self.backend.builtin("memory_manager.clear")()

    def prefill(self, seq_id: int, embeds: np.ndarray) -> np.ndarray:
        """Feed [n, hidden] embeddings in chunks of `prefill_chunk_size`; logits of the last position."""
        for start in range(0, len(embeds), self.prefill_chunk_size):
            chunk = embeds[start : start + self.prefill_chunk_size]
            self.kv.begin_forward([seq_id], [len(chunk)])
            result = self._entry("prefill")(tvm.runtime.tensor(chunk[None], self.device), self.kv.handle, self.params)
            logits, self.kv.handle = self.backend.pair(result)
            self.kv.end_forward()
        return logits.numpy()[0, -1]

    def decode(self, seq_id: int, token: int) -> np.ndarray:
        embed = self._entry("embed")(tvm.runtime.tensor(np.asarray([token], np.int32), self.device), self.params)
        embed = self.backend.builtin("reshape")(embed, self.backend.shape(1, 1, self.hidden_size))
        self.kv.begin_forward([seq_id], [1])
        logits, self.kv.handle = self.backend.pair(self._entry("decode")(embed, self.kv.handle, self.params))
        self.kv.end_forward()
        return logits.numpy()[0, -1]

    def batch_decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each of several sequences in one call (`batch_decode`: each weight read once for
        the batch); logits [len(seq_ids), vocab]."""
        if "batch_decode" not in self.functions:
            raise MobileVLMError(
                f"{self.lib_path}: has no batch_decode (built by an older mobilevlm-mlc); compile it again"
            )
        embeds = self._entry("embed")(tvm.runtime.tensor(np.asarray(tokens, np.int32), self.device), self.params)
        embeds = self.backend.builtin("reshape")(embeds, self.backend.shape(len(tokens), 1, self.hidden_size))
        self.kv.begin_forward(seq_ids, [1] * len(seq_ids))
        logits, self.kv.handle = self.backend.pair(self._entry("batch_decode")(embeds, self.kv.handle, self.params))
        self.kv.end_forward()
        return logits.numpy()[:, 0]

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

    def generate_batch(
        self,
        prompts: list[str],
        images: list[Image.Image | Path | str | None] | None = None,
        config: GenerationConfig | None = None,
    ) -> list[TurnResult]:
        """Answer several prompts together: one sequence each in the shared paged KV cache, prefilled in
        turn, then decoded one token per live sequence per round (interleaved single-sequence calls: the
        library has no batched entry points). Each answer is what its prompt gives alone."""
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise MobileVLMError(
                f"generate_batch got {len(prompts)} prompts but {len(images)} images (use None for none)"
            )
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
