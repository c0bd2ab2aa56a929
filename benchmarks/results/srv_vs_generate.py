import sys, time, json, torch, httpx, tempfile, statistics
sys.path.insert(0,'/work/main'); sys.path.insert(0,'/work/main/benchmarks')
torch.set_num_threads(int(sys.argv[1]))
from lorakit.serve.server import ServeConfig, ThreadedServer, free_port, model_dir
from serve_load import prompts
mdir=str(model_dir('smollm2'))
root=tempfile.mkdtemp()
srv=ThreadedServer(ServeConfig(model=mdir, adapters=root, port=free_port(), prompt_cache=0, weights='int8'))
base=srv.server.settings.base_id
model=srv.server.engine.model; tok=srv.server.engine.tokenizer
text=prompts(4)[1]
ids=tok(text, return_tensors='pt').input_ids
print('prompt tokens', ids.shape)
def via_server():
    t=time.perf_counter()
    r=httpx.post(srv.url+'/completions', json={"model":base,"prompt":text,"max_tokens":32,"temperature":0,"min_tokens":32}, timeout=600).json()
    return time.perf_counter()-t, r['usage']['completion_tokens']
def via_generate():
    t=time.perf_counter()
    with torch.inference_mode():
        out=model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    return time.perf_counter()-t, out.shape[1]-ids.shape[1]
via_server(); via_generate()
for i in range(3):
    print('server', via_server(), 'generate', via_generate())
srv.close()
