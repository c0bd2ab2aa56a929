import sys, time, asyncio, cProfile, pstats, tempfile, torch
from pathlib import Path
sys.path.insert(0,'/work/main'); sys.path.insert(0,'/work/main/benchmarks')
torch.set_num_threads(int(sys.argv[2]))
from lorakit.serve import engine as E
from lorakit.serve.server import ServeConfig, ThreadedServer, free_port, model_dir
from serve_load import prompts, make_adapters, drive
orig = E.Engine._run
PROFS = []
def prof_run(self):
    pr = cProfile.Profile(); PROFS.append(pr); pr.enable()
    try: orig(self)
    finally: pr.disable()
E.Engine._run = prof_run
mdir = str(model_dir('smollm2'))
root = Path(tempfile.mkdtemp()) / "adapters"; root.mkdir()
names = make_adapters(mdir, root, 64)
srv = ThreadedServer(ServeConfig(model=mdir, adapters=str(root), port=free_port(), max_loaded=64, max_batch=32, max_queue=4096, prompt_cache=0))
texts = prompts(256)
base = srv.server.settings.base_id
asyncio.run(drive(srv.url, names, texts, 32, 64, 2, 60))
mode = sys.argv[1]
PROFS[0].disable(); PROFS[0] = None
pr = cProfile.Profile()
# re-enable profiling inside the engine thread: swap in a fresh profiler via a call on the engine thread
fut = srv.server.engine.call(lambda: pr.enable()); fut.result()
t = time.time()
res = asyncio.run(drive(srv.url, names if mode == "mix" else [base], texts, 32, 64, 32, 600))
print(mode, res, time.time() - t)
srv.server.engine.call(lambda: pr.disable()).result()
srv.close()
pstats.Stats(pr).sort_stats('tottime').print_stats(25)
