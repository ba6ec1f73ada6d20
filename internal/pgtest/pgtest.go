// Package pgtest gives tests (and the demo) real PostgreSQL servers and fresh
// databases. It never mocks the database.
//
// A server comes from the first backend that works, in this order:
//
//  1. An existing server named by the environment variable SWO_TEST_DATABASE_URL
//     (a URL for a role that may CREATE DATABASE and CREATE ROLE, typically a
//     superuser). Tests that need a server of their own (to stop, kill or
//     restart it) cannot use it and fall through to the next backends.
//  2. A Docker engine, through dockertest, when one answers (image
//     SWO_TEST_DOCKER_IMAGE, default postgres:15).
//  3. Local PostgreSQL binaries (initdb and postgres, found through
//     SWO_TEST_PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin or
//     PATH), started in a temporary directory on a free loopback port, as the
//     `postgres` user when the process runs as root.
//
// SWO_TEST_BACKEND=env|docker|local forces one backend. When no backend works
// the test fails with a message that says how to provide one: it never skips.
//
// Each test package shares one server (see Main and Shared); a test gets its
// own empty database from it in a few tens of milliseconds (NewDatabase).
// Servers started here run with fsync off (they are throwaway) but keep
// synchronous_commit on, so that a killed server keeps every acknowledged
// commit, as a real one does; they allow prepared transactions and logical
// replication slots (tests that need them use a server of their own when the
// shared one does not).
//
// Every server requires a password over TCP, so URLs handed to tests carry
// one; tests use that to check that passwords never leak into errors or logs.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Environment variables understood by the harness.
const (
	EnvURL     = "SWO_TEST_DATABASE_URL"
	EnvBackend = "SWO_TEST_BACKEND"
	EnvBinDir  = "SWO_TEST_PG_BINDIR"
	EnvImage   = "SWO_TEST_DOCKER_IMAGE"
)

// howTo is appended to every "no server" failure.
const howTo = `pgtest: no PostgreSQL server available. Provide one of:
  - SWO_TEST_DATABASE_URL=postgres://user:pass@host:5432/postgres (a role that may CREATE DATABASE and CREATE ROLE)
  - a running Docker engine (dockertest starts postgres:15)
  - PostgreSQL server binaries: apt-get install postgresql (initdb/postgres are found via pg_config or /usr/lib/postgresql/*/bin),
    or SWO_TEST_PG_BINDIR=/path/to/bin`

// Server is a PostgreSQL server used by tests.
type Server struct {
	backend  string // "env", "docker" or "local"
	host     string
	port     int
	user     string // a role that may create databases and roles
	password string
	adminDB  string
	params   url.Values // extra URL parameters of an env server (sslmode, …)

	ctl serverControl // nil for env servers: they cannot be stopped
}

// serverControl is implemented by backends whose server belongs to the test.
type serverControl interface {
	stop(ctx context.Context) error    // clean (fast) shutdown
	kill(ctx context.Context) error    // crash: no shutdown checkpoint, connections cut
	start(ctx context.Context) error   // start again after stop or kill, same port and data
	destroy(ctx context.Context) error // stop and remove everything
}

// Backend names the kind of server: "env", "docker" or "local".
func (s *Server) Backend() string { return s.backend }

// Addr is host:port of the server.
func (s *Server) Addr() string { return net.JoinHostPort(s.host, strconv.Itoa(s.port)) }

// URL returns a URL for user/password on database db of this server.
func (s *Server) URL(user, password, db string) string {
	u := url.URL{Scheme: "postgres", Host: s.Addr(), Path: "/" + db}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	q := url.Values{}
	for k, v := range s.params {
		q[k] = v
	}
	if q.Get("sslmode") == "" {
		q.Set("sslmode", "disable")
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// AdminURL is a URL for the administrative role on the maintenance database.
func (s *Server) AdminURL() string { return s.URL(s.user, s.password, s.adminDB) }

// AdminPassword is the administrative role's password (tests search logs for it).
func (s *Server) AdminPassword() string { return s.password }

// Start starts a server from the first backend that works. ownServer excludes
// the env backend, whose server cannot be stopped or killed by a test.
func Start(ctx context.Context, ownServer bool) (*Server, error) {
	forced := os.Getenv(EnvBackend)
	var errs []string
	try := func(name string, fn func(context.Context) (*Server, error)) *Server {
		if forced != "" && forced != name {
			return nil
		}
		s, err := fn(ctx)
		if err != nil {
			errs = append(errs, fmt.Sprintf("  %s: %v", name, err))
			return nil
		}
		return s
	}
	if !ownServer {
		if s := try("env", startEnv); s != nil {
			return s, nil
		}
	}
	if s := try("docker", startDocker); s != nil {
		return s, nil
	}
	if s := try("local", startLocal); s != nil {
		return s, nil
	}
	return nil, fmt.Errorf("%s\nbackends tried:\n%s", howTo, strings.Join(errs, "\n"))
}

// Stop shuts the server down cleanly (fast shutdown). Connections are cut.
func (s *Server) Stop(ctx context.Context) error {
	if s.ctl == nil {
		return errors.New("pgtest: an env server cannot be stopped; use NewServer")
	}
	return s.ctl.stop(ctx)
}

// Kill crashes the server: no shutdown checkpoint, every connection cut.
func (s *Server) Kill(ctx context.Context) error {
	if s.ctl == nil {
		return errors.New("pgtest: an env server cannot be killed; use NewServer")
	}
	return s.ctl.kill(ctx)
}

// Restart starts a stopped or killed server again on the same address, with
// its data (a killed one goes through crash recovery).
func (s *Server) Restart(ctx context.Context) error {
	if s.ctl == nil {
		return errors.New("pgtest: an env server cannot be restarted; use NewServer")
	}
	return s.ctl.start(ctx)
}

// Close stops the server and removes its data. An env server is left alone.
func (s *Server) Close() error {
	if s.ctl == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return s.ctl.destroy(ctx)
}

// Admin connects to the maintenance database as the administrative role.
func (s *Server) Admin(ctx context.Context) (*pgx.Conn, error) {
	return pgx.Connect(ctx, s.AdminURL())
}

// Database is a database created by the harness.
type Database struct {
	Name     string
	Owner    string // role that owns the database (the admin role unless Owner was given)
	Password string // Owner's password
	URL      string // URL for Owner on this database
	srv      *Server
}

// DBOption configures CreateDatabase.
type DBOption func(*dbOptions)

type dbOptions struct {
	owner string
}

// Owner makes the database owned by a new non-superuser role of that name
// prefix (a random suffix is added), and the returned URL connects as it, as
// on a managed database.
func Owner(prefix string) DBOption { return func(o *dbOptions) { o.owner = prefix } }

// RandomName returns prefix followed by random hex, usable as an identifier.
func RandomName(prefix string) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b[:])
}

// CreateDatabase creates a fresh empty database.
func (s *Server) CreateDatabase(ctx context.Context, opts ...DBOption) (*Database, error) {
	var o dbOptions
	for _, opt := range opts {
		opt(&o)
	}
	conn, err := s.Admin(ctx)
	if err != nil {
		return nil, fmt.Errorf("pgtest: connect admin: %w", err)
	}
	defer conn.Close(context.Background())

	d := &Database{Name: RandomName("t_"), Owner: s.user, Password: s.password, srv: s}
	if o.owner != "" {
		d.Owner = RandomName(o.owner + "_")
		d.Password = RandomName("pw")
		_, err = conn.Exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", d.Owner, d.Password))
		if err != nil {
			return nil, fmt.Errorf("pgtest: create role: %w", err)
		}
	}
	_, err = conn.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s OWNER %s TEMPLATE template0", d.Name, d.Owner))
	if err != nil {
		return nil, fmt.Errorf("pgtest: create database: %w", err)
	}
	if o.owner != "" {
		// Since PostgreSQL 15 only the database owner may create in schema
		// public; make the owner role its owner too, as managed services do.
		dconn, err := pgx.Connect(ctx, s.URL(s.user, s.password, d.Name))
		if err != nil {
			return nil, fmt.Errorf("pgtest: connect new database: %w", err)
		}
		_, err = dconn.Exec(ctx, "ALTER SCHEMA public OWNER TO "+d.Owner)
		dconn.Close(context.Background())
		if err != nil {
			return nil, fmt.Errorf("pgtest: alter schema public: %w", err)
		}
	}
	d.URL = s.URL(d.Owner, d.Password, d.Name)
	return d, nil
}

// AdminURL is a URL for the administrative role on this database.
func (d *Database) AdminURL() string { return d.srv.URL(d.srv.user, d.srv.password, d.Name) }

// Drop removes the database (closing its sessions) and its owner role if the
// harness created one.
func (d *Database) Drop(ctx context.Context) error {
	conn, err := d.srv.Admin(ctx)
	if err != nil {
		return fmt.Errorf("pgtest: connect admin: %w", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+d.Name+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("pgtest: drop database %s: %w", d.Name, err)
	}
	if d.Owner != d.srv.user {
		if _, err := conn.Exec(ctx, "DROP ROLE IF EXISTS "+d.Owner); err != nil {
			return fmt.Errorf("pgtest: drop role %s: %w", d.Owner, err)
		}
	}
	return nil
}

// ---- testing helpers ----

var shared struct {
	mu      sync.Mutex
	inMain  bool
	started bool
	srv     *Server
	err     error
}

// Main runs the tests of a package and then stops the package's shared
// server. Every test package that uses Shared calls it from TestMain:
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
func Main(m *testing.M) {
	shared.mu.Lock()
	shared.inMain = true
	shared.mu.Unlock()
	code := m.Run()
	shared.mu.Lock()
	if shared.srv != nil {
		if err := shared.srv.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest: stopping shared server:", err)
		}
	}
	shared.mu.Unlock()
	os.Exit(code)
}

// Shared returns the package's shared server, starting it on first use.
func Shared(t testing.TB) *Server {
	t.Helper()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if !shared.inMain {
		t.Fatal("pgtest: call pgtest.Main(m) from TestMain so that the shared server is stopped after the tests")
	}
	if !shared.started {
		shared.started = true
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		shared.srv, shared.err = Start(ctx, false)
		cancel()
	}
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.srv
}

// NewServer starts a server that belongs to the test (it may stop, kill and
// restart it); it is removed when the test ends.
func NewServer(t testing.TB) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := Start(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("pgtest: stopping server: %v", err)
		}
	})
	return s
}

// NewDatabase creates a fresh empty database on the shared server, dropped
// when the test ends.
func NewDatabase(t testing.TB, opts ...DBOption) *Database {
	t.Helper()
	return Shared(t).NewDatabase(t, opts...)
}

// NewDatabase creates a fresh empty database on s, dropped when the test ends.
func (s *Server) NewDatabase(t testing.TB, opts ...DBOption) *Database {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := s.CreateDatabase(ctx, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := d.Drop(ctx); err != nil {
			// A test that stopped its own server cannot drop; the server goes anyway.
			if s.ctl == nil {
				t.Errorf("%v", err)
			}
		}
	})
	return d
}

// Connect opens a pgx connection closed at the end of the test.
func Connect(t testing.TB, url string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// Exec runs SQL statements (simple protocol, may be several) and fails the test on error.
func Exec(t testing.TB, url string, sql string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if err := c.PgConn().Exec(ctx, sql).Close(); err != nil {
		t.Fatalf("exec %q: %v", abbreviate(sql), err)
	}
}

func abbreviate(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 120 {
		return s[:117] + "..."
	}
	return s
}

// waitReady polls until the server accepts connections or ctx ends.
func waitReady(ctx context.Context, s *Server, exited <-chan struct{}) error {
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := pgx.Connect(cctx, s.AdminURL())
		cancel()
		if err == nil {
			c.Close(context.Background())
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("server at %s not ready: %w (last: %v)", s.Addr(), ctx.Err(), last)
		case <-exited:
			return fmt.Errorf("server at %s exited during start-up (last connect error: %v)", s.Addr(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// freePort asks the kernel for a free loopback TCP port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Role is a login role created by the harness for one test.
type Role struct {
	Name, Password string
	URL            string // URL for the role on the database it was made for
}

// NewRole creates a login role (a non-superuser) that may connect to d, and
// runs grants (SQL, where %[1]s is the role's name) in d as the
// administrative role. The role is dropped, with what it owns and its
// privileges in d, when the test ends.
func (d *Database) NewRole(t testing.TB, prefix, grants string) Role {
	t.Helper()
	r := Role{Name: RandomName(prefix + "_"), Password: RandomName("pw")}
	r.URL = d.srv.URL(r.Name, r.Password, d.Name)
	Exec(t, d.AdminURL(), fmt.Sprintf("CREATE ROLE %[1]s LOGIN PASSWORD '%[2]s'; GRANT CONNECT ON DATABASE %[3]s TO %[1]s; GRANT USAGE ON SCHEMA public TO %[1]s;",
		r.Name, r.Password, d.Name)+fmt.Sprintf(grants, r.Name))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, d.AdminURL())
		if err != nil {
			return // the database may be gone with its server
		}
		defer conn.Close(context.Background())
		_, _ = conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", r.Name)
		if _, err := conn.Exec(ctx, fmt.Sprintf("DROP OWNED BY %[1]s; REVOKE ALL ON DATABASE %[2]s FROM %[1]s; DROP ROLE %[1]s", r.Name, d.Name)); err != nil {
			t.Errorf("pgtest: drop role %s: %v", r.Name, err)
		}
	})
	return r
}
