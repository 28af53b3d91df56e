"""Peak memory of a function as the allocator saw it, for the tests and benchmarks/train_memory.py: CUDA's own
peak counter, or on the CPU the profiler's allocation events (the CPU allocator keeps no peak of its own)."""
import torch


def cpu_allocator_peak(fn):
    """(peak bytes the CPU allocator had handed out at once while fn ran, fn's result)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak, result


def allocator_peak(device, fn):
    """(peak bytes allocated on `device` while fn ran, above what was allocated before it; fn's result)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    return cpu_allocator_peak(fn)
