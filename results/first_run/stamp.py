"""Run a command; print each stdout line with seconds since launch; then the total."""
import subprocess, sys, time
t0 = time.time()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
for line in p.stdout:
    print(f"{time.time() - t0:7.1f} s  {line}", end="", flush=True)
p.wait()
print(f"total {time.time() - t0:.1f} s, exit {p.returncode}")
