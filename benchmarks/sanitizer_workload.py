"""A small forward+backward through every op (testing.OPS), for compute-sanitizer on a GPU
(benchmarks/gpu_check.sh), and for its counterpart on the CPU: the CUDA code
executed on the CPU under ThreadSanitizer, which reports any data race
between the emulated threads (`make test` runs it so). The tests run it on
the CPU and on the emulated CUDA code, so it cannot rot.

    python benchmarks/sanitizer_workload.py --device cuda
    TSAN_OPTIONS=exitcode=66 OMP_NUM_THREADS=1 LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" \
        python benchmarks/sanitizer_workload.py --device cpu --emulate
"""
import argparse
import contextlib

import torch

import varlen_kernels as vk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--emulate", action="store_true", help="CPU tensors, the CUDA kernels' code")
    args = ap.parse_args(argv)
    dev = args.device
    ctx = vk.testing.emulate_cuda(order="random") if args.emulate else contextlib.nullcontext()
    limits = vk.testing.emulated_device if args.emulate else (lambda **_: contextlib.nullcontext())
    torch.manual_seed(0)
    with ctx:
        for cell in ["lstm", "gru", "rnn_tanh"]:
            for bidirectional in (False, True):  # rnn_forward / rnn_bidirectional_forward
                m = vk.MaskedRNN(5, 7, cell=cell, num_layers=2, bidirectional=bidirectional,
                                 batch_first=True).to(dev)
                x = torch.randn(3, 6, 5, device=dev, requires_grad=True)
                y, _ = m(x, torch.tensor([6, 0, 3], device=dev))
                y.sum().backward()
        # Grids of several CTAs and row tiles that finish early: the persistent
        # kernels' grid barriers and tile skipping (on the CPU, an emulated
        # device of 4 SMs, so that the CTAs own several units each), then
        # their cluster form (clusters of 2 CTAs: 20 units each, a cluster for
        # each tile of rows), with the CUDA-core product (float32) and the
        # tensor-core one (bfloat16), whose rows go from CTA to CTA through
        # the cluster's distributed shared memory (one value at a time before
        # a cluster barrier; then, in clusters of 5 CTAs of 8 units, 16-byte
        # stores completing on mbarriers), then through global memory.
        # Then the grid form's tensor-core kernels staging by 16-byte
        # asynchronous copies through one slot and in chunks through
        # 2 slots of them (40 KiB: the backward's 160
        # columns in 3 chunks), and by bulk copies on an mbarrier (one slot of
        # at most 24 KiB; bfloat16 takes them by default where the staging
        # has one slot). Last, the grid form as 2 row groups of 2 CTAs (16-row
        # tiles in turn: the second group runs out of rows first; by default
        # the backward takes 2 groups at this batch of 40).
        # (6 steps: the exchange's two buffers each filled and read twice over)
        lengths = torch.cat([torch.full((8,), 6), torch.randint(0, 4, (32,))])
        for sync, emulated, exchange, stage, slots, copy, groups in (
                ("grid", dict(sm_count=4), "auto", "auto", "auto", "auto", "auto"),
                ("auto", dict(max_cluster_blocks=2), "auto", "auto", "auto", "auto", "auto"),
                ("auto", dict(max_cluster_blocks=5), "auto", "auto", "auto", "auto", "auto"),
                ("auto", dict(max_cluster_blocks=2), "global", "auto", "auto", "auto", "auto"),
                ("grid", dict(sm_count=4), "auto", "auto", "auto", "async", "auto"),
                ("grid", dict(sm_count=4), "auto", "40", "2", "async", "auto"),
                ("grid", dict(sm_count=4), "auto", "24", "auto", "bulk", "auto"),
                ("grid", dict(sm_count=4), "auto", "auto", "auto", "auto", "2")):
            with vk.testing.env_setting("VARLEN_KERNELS_PERSISTENT_SYNC", sync), \
                    vk.testing.env_setting("VARLEN_KERNELS_PERSISTENT_GROUPS", groups), \
                    vk.testing.env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", exchange), \
                    vk.testing.env_setting("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", stage), \
                    vk.testing.env_setting("VARLEN_KERNELS_PERSISTENT_SLOTS", slots), \
                    vk.testing.env_setting("VARLEN_KERNELS_PERSISTENT_COPY", copy), \
                    limits(**emulated):
                # (the exchange, the staging's slots and its copies concern the
                # tensor-core kernels only; the clusters of 5 are there for the
                # exchange's stores on mbarriers and the groups case for the
                # grid form's row groups, neither of which the projection
                # LSTM's kernels take: both run the plain cells on tensor
                # cores only, the groups' barriers and rows being the same in
                # the CUDA-core kernels)
                plain_cells_only = emulated.get("max_cluster_blocks") == 5 or groups != "auto"
                tensor_cores_only = exchange == "global" or stage != "auto" or plain_cells_only
                print(f"persistent kernels: sync={sync} exchange={exchange} stage={stage} "
                      f"slots={slots} copy={copy} groups={groups}", flush=True)  # (where a slow run has got to)
                for dtype in (torch.float32, torch.bfloat16)[tensor_cores_only:]:
                    for cell, proj_size, bidirectional in [("lstm", 0, True), ("gru", 0, True),
                                                           ("lstm", 12, True), ("lstm", 0, False),
                                                           ("lstm", 12, False)]:
                        if plain_cells_only and proj_size:
                            continue
                        m = vk.MaskedRNN(6, 40, cell=cell, bidirectional=bidirectional,
                                         proj_size=proj_size).to(dev, dtype)
                        y, _ = m(torch.randn(6, 40, 6, device=dev, dtype=dtype), lengths.to(dev))
                        y.float().sum().backward()
        proj = vk.MaskedLSTM(5, 7, 1, proj_size=3, bidirectional=True).to(dev)
        for lengths in (torch.tensor([6, 0, 3]), torch.tensor([6, 0, 3], device=dev)):
            y, _ = proj(torch.randn(6, 3, 5, device=dev), lengths)  # host, then device lengths
            y.sum().backward()
        logits = torch.randn(3, 6, 11, device=dev, requires_grad=True)
        target = torch.randint(0, 11, (3, 6), device=dev)
        lengths = torch.tensor([6, 0, 2])
        vk.masked_cross_entropy(logits, target, lengths, batch_first=True, label_smoothing=0.1,
                                weight=torch.rand(11, device=dev)).backward()
        # lengths on the device (checked by the kernel), a mask, per-token losses
        vk.masked_cross_entropy(logits, target, lengths.to(dev), batch_first=True).backward()
        vk.masked_cross_entropy(logits.transpose(0, 1), target.t(), mask=target.t() > 3,
                                reduction="none").sum().backward()
        valid = (torch.arange(6)[None, :] < lengths[:, None]).to(dev).reshape(-1)
        torch.ops.varlen_kernels.cross_entropy_forward(logits.detach().reshape(-1, 11),
                                                       target.reshape(-1), valid, 0.0)
        vk.masked_mse(logits, logits.detach() * 0.5, lengths, batch_first=True).backward()
        # lengths on the device (checked by the kernel), a mask, per-element losses
        vk.masked_bce_with_logits(logits, torch.rand_like(logits), lengths.to(dev), batch_first=True,
                                  pos_weight=torch.rand(11, device=dev)).backward()
        vk.masked_mse(logits.transpose(0, 1), logits.detach().transpose(0, 1), mask=target.t() > 3,
                      reduction="none").sum().backward()
        torch.ops.varlen_kernels.elementwise_loss_forward(logits.detach().reshape(-1, 11),
                                                          logits.detach().reshape(-1, 11), valid,
                                                          None, "mse", False)
        hidden = torch.randn(6, 3, 8, device=dev, requires_grad=True)
        head = vk.MaskedLinearCrossEntropy(8, 50).to(dev)
        head(hidden, torch.randint(0, 50, (6, 3), device=dev), torch.tensor([6, 0, 2])).backward()
        head(hidden, torch.randint(0, 50, (6, 3), device=dev), torch.tensor([6, 1, 2]),
             reduction="none").sum().backward()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
