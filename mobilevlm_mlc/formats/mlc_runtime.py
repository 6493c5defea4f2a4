"""What MLC's Android runtime can run: the TVM runtime that mlc4j compiles into its app, against what a
library calls at run time.

mlc4j's `src/cpp/tvm_runtime.h` (mlc-llm at `mlc_contract.MLC_LLM_COMMIT`) compiles these TVM runtime sources, and no
others (no `runtime/contrib/*`: a library calling `tvm.contrib.*` cannot run in the app). The global
functions each source registers, the KV cache constructor's argument counts and the VM bytecode format
are read from apache/tvm at `TVM_COMMIT`: mlc4j pins `3rdparty/tvm` to mlc-ai/relax at `MLC4J_TVM_COMMIT`,
which is not in the snapshot of mlc-ai/relax available here (it stops at 2024-03), so the newest apache/tvm
stands in for it. A user must build with a TVM whose VM format, KV cache constructor and tvm-ffi ABI
match the app's runtime (mlc-llm #2832, #2910 were this drift).
"""

from __future__ import annotations

import struct

TVM_COMMIT = "5d4dc87"  # apache/tvm, 2026-08-22
MLC4J_TVM_COMMIT = "837cb9de"  # mlc-ai/relax, mlc-llm's 3rdparty/tvm at MLC_LLM_COMMIT

# runtime sources mlc4j compiles in (besides tvm-ffi's core): the ones that register global functions
MLC4J_RUNTIME_SOURCES = (
    "runtime/cpu_device_api.cc", "runtime/device_api.cc", "runtime/file_utils.cc", "runtime/logging.cc",
    "runtime/memory/memory_manager.cc", "runtime/module.cc", "runtime/nvtx.cc",
    "runtime/opencl/opencl_device_api.cc", "runtime/opencl/opencl_module.cc", "runtime/profiling.cc",
    "runtime/source_utils.cc", "runtime/tensor.cc", "runtime/thread_pool.cc", "runtime/threading_backend.cc",
    "runtime/vm/attn_backend.cc", "runtime/vm/builtin.cc", "runtime/vm/bytecode.cc", "runtime/vm/executable.cc",
    "runtime/vm/kv_state.cc", "runtime/vm/paged_kv_cache.cc", "runtime/vm/rnn_state.cc",
    "runtime/vm/tensor_cache_support.cc", "runtime/vm/vm.cc", "runtime/workspace_pool.cc",
)  # fmt: skip

# the TVM source registering each global function our libraries and driver call (apache/tvm TVM_COMMIT)
REGISTERED_IN = {
    **dict.fromkeys(
        (
            "vm.builtin.alloc_shape_heap", "vm.builtin.alloc_storage", "vm.builtin.alloc_tensor",
            "vm.builtin.check_shape_info", "vm.builtin.check_tensor_info", "vm.builtin.check_tuple_info",
            "vm.builtin.copy", "vm.builtin.make_shape", "vm.builtin.make_tuple", "vm.builtin.match_shape",
            "vm.builtin.null_value", "vm.builtin.reshape", "vm.builtin.tuple_getitem",
        ),
        "runtime/vm/builtin.cc",
    ),
    **dict.fromkeys(
        (
            "vm.builtin.attention_kv_cache_attention_with_fused_qkv", "vm.builtin.kv_state_begin_forward",
            "vm.builtin.kv_state_end_forward", "vm.builtin.kv_state_add_sequence",
            "vm.builtin.kv_state_remove_sequence", "vm.builtin.attention_kv_cache_get_num_available_pages",
        ),
        "runtime/vm/kv_state.cc",
    ),
    "vm.builtin.paged_attention_kv_cache_create": "runtime/vm/paged_kv_cache.cc",
    "vm.builtin.memory_manager.clear": "runtime/memory/memory_manager.cc",
}  # fmt: skip

# argument counts the runtime's constructor accepts (it ICHECKs them)
CALL_ARITIES = {"vm.builtin.paged_attention_kv_cache_create": (28, 29)}
VM_BYTECODE_MAGIC = (0xD225DE2F4214151D, 0xD225DE2F4214151E)
VM_VERSION = "0.14"


def vm_format(vm_payload: bytes) -> tuple[int, str]:
    """(magic, version) at the head of serialized VM bytecode: a u64, then a length-prefixed string."""
    magic, length = struct.unpack_from("<QQ", vm_payload)
    return magic, vm_payload[16 : 16 + length].decode("ascii", errors="replace")


def runtime_problems(calls: dict[str, set[int]], vm_header: tuple[int, str]) -> list[str]:
    """What mlc4j's runtime would lack or refuse, in words (empty: nothing): `calls` maps each global
    function the VM bytecode calls to the argument counts it passes."""
    problems = []
    for name, arities in sorted(calls.items()):
        source = REGISTERED_IN.get(name)
        if source is None:
            problems.append(f"'{name}' is not among the functions checked against mlc4j's runtime")
        elif source not in MLC4J_RUNTIME_SOURCES:
            problems.append(f"'{name}' is registered in TVM's {source}, which mlc4j's runtime does not compile")
        accepted = CALL_ARITIES.get(name)
        if accepted and not arities <= set(accepted):
            problems.append(f"'{name}' is called with {sorted(arities)} arguments, the runtime takes {list(accepted)}")
    magic, version = vm_header
    if magic not in VM_BYTECODE_MAGIC or version != VM_VERSION:
        problems.append(f"VM bytecode {magic:#x} version {version!r}, the runtime reads version {VM_VERSION!r}")
    return problems
