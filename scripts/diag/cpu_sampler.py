"""Every 0.2 s: /proc/stat deltas and the 10 busiest threads (tp_pull_stall.py runs it
under SCHED_FIFO)."""
import os, sys, time, json
out = open(sys.argv[1], "a", buffering=1)
def cpu():
    return [int(x) for x in open("/proc/stat").readline().split()[1:]]
def allthreads():
    d = {}
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try: tids = os.listdir(f"/proc/{p}/task")
        except OSError: continue
        for t in tids:
            try: st = open(f"/proc/{p}/task/{t}/stat").read()
            except OSError: continue
            name = st[st.index("(")+1:st.rindex(")")]
            f = st.rsplit(")", 1)[1].split()
            d[(int(p), int(t))] = (name, f[0], int(f[11]) + int(f[12]), int(f[36]), int(f[15]), int(f[38]))
    return d
pc, pt, ptime = cpu(), allthreads(), time.time()
while True:
    time.sleep(0.2)
    c, t, now = cpu(), allthreads(), time.time()
    dc = [a - b for a, b in zip(c, pc)]
    top = sorted(((v[2] - pt[k][2], k[0], k[1], v[0], v[1], v[3], v[4], v[5]) for k, v in t.items()
                  if k in pt and v[2] - pt[k][2] > 0), reverse=True)[:10]
    out.write(json.dumps({"t": now, "dt": now - ptime, "cpu": dc, "top": top}) + "\n")
    pc, pt, ptime = c, t, now
