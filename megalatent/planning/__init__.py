"""The scaling planner: a run's memory, communication and step time per rank, from the real code simulated
at full size on fake tensors (tools/plan.py is its command line; README "Plan a run").

    world.py        the simulated world: fake process groups at any size, fake tensors, the values a rank reads
    simulate.py     one rank: the real build, parallelization and training step inside the trackers
    memory.py       its memory (torch's MemTracker)
    collectives.py  its collectives, by process group
    cost.py         its operators' FLOPs and roofline time
    step.py         the trainer's step on a synthetic batch
    workers.py      the rank roles of a layout, one process each
    estimate.py     step time, pipeline bubble, MFU
    hardware.py     the GPUs, and what a GPU run does differently
    plan.py         a layout's plan and its verdict
    search.py       every valid layout, ranked
    report.py       the plan as a table
"""
