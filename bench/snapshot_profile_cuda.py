import time, torch
torch.set_num_threads(1)
dev = torch.device("cuda")
counts = torch.zeros(58, 256, dtype=torch.int64, device=dev)
ones = torch.ones(1024, dtype=torch.int64, device=dev)
ids = [torch.randint(256, (128, 8), device=dev) for _ in range(58)]
pinned = torch.zeros(58, 256, dtype=torch.int64, pin_memory=True)
print("pinned:", pinned.is_pinned())
def t(fn, n=2000):
    out = []
    for _ in range(n):
        for l in range(58):
            counts[l].index_add_(0, ids[l].reshape(-1), ones[:1024])
        a = time.perf_counter(); fn(); b = time.perf_counter(); out.append((b - a) * 1e6)
    torch.cuda.synchronize(); out.sort(); return f"p50 {out[len(out)//2]:.1f} p99 {out[int(len(out)*.99)]:.1f}"
print("copy_ non_blocking to pinned:", t(lambda: pinned.copy_(counts, non_blocking=True)))
print("Event():", t(lambda: torch.cuda.Event()))
ev = torch.cuda.Event()
print("event.record():", t(lambda: ev.record()))
print("index_add_ one layer:", t(lambda: counts[0].index_add_(0, ids[0].reshape(-1), ones[:1024])))
def all3():
    pinned.copy_(counts, non_blocking=True); e = torch.cuda.Event(); e.record()
print("all three:", t(all3))
