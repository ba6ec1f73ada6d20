package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// localServer runs initdb/postgres binaries in a temporary directory.
type localServer struct {
	s      *Server
	bin    string
	dir    string // temporary directory: data/, server.log, sockets
	cred   *syscall.Credential
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

func startLocal(ctx context.Context) (*Server, error) {
	bin, err := findBinDir()
	if err != nil {
		return nil, err
	}
	ls := &localServer{bin: bin}
	if os.Geteuid() == 0 {
		// postgres refuses to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, errors.New("running as root and there is no 'postgres' user to run the server as")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		ls.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	parent := ""
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		parent = "/dev/shm" // memory-backed: faster database creation
	}
	ls.dir, err = os.MkdirTemp(parent, "swo-pgtest-")
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Server, error) {
		_ = os.RemoveAll(ls.dir)
		return nil, err
	}
	if err := ls.chown(ls.dir); err != nil {
		return fail(err)
	}
	password := RandomName("pgtest-secret-")
	pwfile := filepath.Join(ls.dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(password+"\n"), 0o600); err != nil {
		return fail(err)
	}
	if err := ls.chown(pwfile); err != nil {
		return fail(err)
	}
	initdb := exec.CommandContext(ctx, filepath.Join(bin, "initdb"),
		"-D", filepath.Join(ls.dir, "data"), "-U", "postgres",
		"--auth-local=trust", "--auth-host=scram-sha-256", "--pwfile="+pwfile,
		"--no-sync", "-E", "UTF8", "--locale=C")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: ls.cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		return fail(fmt.Errorf("initdb: %v: %s", err, lastLines(out, 10)))
	}
	_ = os.Remove(pwfile)
	port, err := freePort()
	if err != nil {
		return fail(err)
	}
	ls.s = &Server{backend: "local", host: "127.0.0.1", port: port, user: "postgres",
		password: password, adminDB: "postgres", ctl: ls}
	if err := ls.start(ctx); err != nil {
		return fail(err)
	}
	return ls.s, nil
}

func (ls *localServer) chown(path string) error {
	if ls.cred == nil {
		return nil
	}
	return os.Chown(path, int(ls.cred.Uid), int(ls.cred.Gid))
}

func (ls *localServer) start(ctx context.Context) error {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.cmd != nil {
		return errors.New("pgtest: server already running")
	}
	logPath := filepath.Join(ls.dir, "server.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(ls.bin, "postgres"),
		"-D", filepath.Join(ls.dir, "data"),
		"-p", strconv.Itoa(ls.s.port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories="+ls.dir,
		"-c", "fsync=off",

		"-c", "full_page_writes=off",
		"-c", "max_connections=500",
		"-c", "shared_buffers=256MB",
		"-c", "max_wal_size=8GB",
		"-c", "checkpoint_timeout=30min",
		"-c", "max_locks_per_transaction=256",
		"-c", "max_prepared_transactions=10",
		"-c", "wal_level=logical",
		"-c", "log_min_messages=warning",
		"-c", "log_min_error_statement=panic",
	)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Own process group so that a crash can take every backend at once; if the
	// test binary dies, the postmaster gets SIGQUIT (immediate shutdown).
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: ls.cred, Setpgid: true, Pdeathsig: syscall.SIGQUIT}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	ls.cmd, ls.exited = cmd, exited
	rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := waitReady(rctx, ls.s, exited); err != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		ls.cmd = nil
		out, _ := os.ReadFile(logPath)
		return fmt.Errorf("%w\nserver log:\n%s", err, lastLines(out, 15))
	}
	return nil
}

func (ls *localServer) signal(ctx context.Context, sig syscall.Signal, group bool) error {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.cmd == nil {
		return nil
	}
	pid := ls.cmd.Process.Pid
	var children []int
	if group {
		children = childrenOf(pid) // backends: killed with the postmaster, as in a machine crash
	}
	if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	for _, c := range children {
		_ = syscall.Kill(c, sig)
	}
	select {
	case <-ls.exited:
	case <-ctx.Done():
		return fmt.Errorf("pgtest: server did not exit after %v: %w", sig, ctx.Err())
	}
	// Wait until every backend is gone, so that a restart finds no shared
	// memory in use.
	for _, c := range children {
		for syscall.Kill(c, 0) == nil && processState(c) != "Z" {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	ls.cmd = nil
	return nil
}

// childrenOf lists the processes whose parent is pid (from /proc).
func childrenOf(pid int) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
		fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(fields) > 1 {
			if ppid, _ := strconv.Atoi(fields[1]); ppid == pid {
				out = append(out, p)
			}
		}
	}
	return out
}

// processState is the state letter of a process ("" if gone).
func processState(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return ""
	}
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(fields) == 0 {
		return ""
	}
	return fields[0]
}

func (ls *localServer) stop(ctx context.Context) error { return ls.signal(ctx, syscall.SIGINT, false) }
func (ls *localServer) kill(ctx context.Context) error { return ls.signal(ctx, syscall.SIGKILL, true) }

func (ls *localServer) destroy(ctx context.Context) error {
	err := ls.signal(ctx, syscall.SIGQUIT, false)
	if err2 := os.RemoveAll(ls.dir); err == nil {
		err = err2
	}
	return err
}

// findBinDir locates a directory holding both initdb and postgres.
func findBinDir() (string, error) {
	has := func(dir string) bool {
		for _, f := range []string{"initdb", "postgres"} {
			if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.IsDir() {
				return false
			}
		}
		return true
	}
	var tried []string
	if d := os.Getenv(EnvBinDir); d != "" {
		if has(d) {
			return d, nil
		}
		return "", fmt.Errorf("%s=%s holds no initdb and postgres", EnvBinDir, d)
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if has(d) {
			return d, nil
		}
		tried = append(tried, d)
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if has(d) {
			return d, nil
		}
		tried = append(tried, d)
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		p, _ = filepath.EvalSymlinks(p)
		if d := filepath.Dir(p); has(d) {
			return d, nil
		}
	}
	return "", fmt.Errorf("no initdb and postgres binaries found (tried pg_config --bindir, /usr/lib/postgresql/*/bin, PATH: %v)", tried)
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

func lastLines(b []byte, n int) string {
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
