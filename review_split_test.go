package swo

// Adversarial review of the router/node/leader split (OpenPool, hooks,
// errors). Each test demonstrates one problem: it fails on the code as
// reviewed and passes once the problem is fixed.

import (
	"context"
	"database/sql"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pgswo/swo/internal/pgtest"
)

// rvOpenPool opens a pool from c (closed when the test ends); mod adjusts a
// configuration parsed from the connector's OldURL, or the pool is opened
// with a nil configuration when mod is nil.
func rvOpenPool(t testing.TB, c *Connector, mod func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	var cfg *pgxpool.Config
	if mod != nil {
		var err error
		if cfg, err = pgxpool.ParseConfig(c.cfg.OldURL); err != nil {
			t.Fatal(err)
		}
		mod(cfg)
	}
	p, err := c.OpenPool(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// rvTryConnLock tries, for at most wait, to take the connection lock
// exclusively on the old database, as the leader does once the drain is
// complete, and releases it if it got it.
func rvTryConnLock(t testing.TB, url string, wait time.Duration) error {
	t.Helper()
	ctx := testCtx(t)
	oc := pgtest.Connect(t, url)
	keys := newLockKeys("swo")
	if _, err := oc.Exec(ctx, "SELECT set_config('lock_timeout', $1, false)", wait.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", keys.space, lockConn); err != nil {
		return err
	}
	_, err := oc.Exec(ctx, "SELECT pg_advisory_unlock($1, $2)", keys.space, lockConn)
	return err
}

// ---- Finding 1: a pool's background connection escapes the drain ----

// TestReviewPoolBackgroundConnectionEscapesTheDrain: pgxpool opens the
// connections of MinConns/MinIdleConns (at NewWithConfig and at every health
// check) through puddle's CreateResource, which pushes the finished
// connection into the idle list without comparing its reset generation (the
// Acquire path does compare it, and destroys a connection constructed across
// a Reset). A connection that took the shared lock before the pause and
// whose construction ends after the drain's Pool.Reset (its admission round
// trip, Config.AfterConnect or the host's AfterConnect still running) is
// therefore parked idle, holding the shared lock, and nothing closes it:
// the leader's exclusive lock never comes and the run fails with
// ErrPauseBudget (the database/sql front end handles the same race in
// connectOld by retiring a connection registered after a pause began).
func TestSplitReviewPoolBackgroundConnectionEscapesTheDrain(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	entered, release := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1",
		// Any work after the admission widens the window; a type
		// registration is a few round trips. Here it is held open.
		AfterConnect: func(ctx context.Context, conn *pgx.Conn) error {
			if first.CompareAndSwap(false, true) {
				close(entered)
				<-release
			}
			return nil
		}})
	pool := rvOpenPool(t, c, func(pc *pgxpool.Config) { pc.MinConns = 1; pc.MaxConns = 4 })
	select {
	case <-entered: // the background connection holds the shared lock now
	case <-time.After(30 * time.Second):
		t.Fatal("background connection not opened")
	}
	c.router.pause(time.Now().Add(time.Minute)) // the drain: Pool.Reset
	defer c.router.resume()
	close(release)
	waitFor(t, func() bool { return pool.Stat().TotalConns() == 1 && pool.Stat().ConstructingConns() == 0 })
	time.Sleep(200 * time.Millisecond)
	if err := rvTryConnLock(t, old.URL, 3*time.Second); err != nil {
		t.Fatalf("after the drain the exclusive connection lock is not granted (%v): the pool holds %d idle connection(s) "+
			"to the old database that still hold the shared lock", err, pool.Stat().IdleConns())
	}
}

// ---- Finding 2: the application's timeouts fail the admission during the window ----

// TestReviewAdmissionFailsOnTheApplicationsTimeouts: the admission (shared
// lock, then state read) runs with the application connection's own
// settings. A statement_timeout or lock_timeout in OldURL, or set by
// Config.BeforeConnect (both common), ends the wait for the shared lock
// while the leader holds the lock exclusively (the whole final sync and
// commit, up to PauseBudget+FinalTimeout): Connect and Acquire then fail
// with "canceling statement due to statement timeout" or "lock timeout",
// where they must wait. Connections reach the admission during the window
// whenever they passed the router before this node saw the pause (other
// nodes announce and lock first; the leader only waits for its own
// observation).
func TestSplitReviewAdmissionFailsOnTheApplicationsTimeouts(t *testing.T) {
	for _, tcase := range []struct {
		name string
		url  string
		cfg  func(*Config)
	}{
		{name: "statement_timeout in OldURL", url: "&statement_timeout=300"},
		{name: "lock_timeout from Config.BeforeConnect", cfg: func(c *Config) {
			c.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
				cc.RuntimeParams["lock_timeout"] = "300"
				return nil
			}
		}},
	} {
		t.Run(tcase.name, func(t *testing.T) {
			old := pgtest.NewDatabase(t)
			next := pgtest.NewDatabase(t)
			cfg := Config{OldURL: old.URL + tcase.url, NextURL: next.URL, NodeName: "n1"}
			if tcase.cfg != nil {
				tcase.cfg(&cfg)
			}
			c := newConnector(t, cfg)
			db := openDB(t, c)
			pool := rvOpenPool(t, c, nil)
			ctx := testCtx(t)

			// The leader's window: the connection lock held exclusively for a
			// second and a half (well within PauseBudget+FinalTimeout).
			keys := newLockKeys("swo")
			leader := pgtest.Connect(t, old.URL)
			if _, err := leader.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", keys.space, lockConn); err != nil {
				t.Fatal(err)
			}
			unlocked := make(chan struct{})
			go func() {
				defer close(unlocked)
				time.Sleep(1500 * time.Millisecond)
				_, _ = leader.Exec(context.Background(), "SELECT pg_advisory_unlock($1, $2)", keys.space, lockConn)
			}()
			var wg sync.WaitGroup
			var sqlErr, poolErr error
			wg.Add(2)
			go func() {
				defer wg.Done()
				var conn *sql.Conn
				if conn, sqlErr = db.Conn(ctx); sqlErr == nil {
					conn.Close()
				}
			}()
			go func() {
				defer wg.Done()
				var conn *pgxpool.Conn
				if conn, poolErr = pool.Acquire(ctx); poolErr == nil {
					conn.Release()
				}
			}()
			wg.Wait()
			<-unlocked
			if sqlErr != nil || poolErr != nil {
				t.Fatalf("a connection opened during the window failed instead of waiting:\n  database/sql: %v\n  pool: %v", sqlErr, poolErr)
			}
		})
	}
}

// ---- Finding 3: Config.BeforeConnect's pgx settings are lost in pools ----

// TestReviewPoolKeepsConfigBeforeConnectSettings: Config.BeforeConnect
// "adjusts the pgx settings of every connection the connector opens" (a
// tracer, the query exec mode a pooler needs). In OpenPool's BeforeConnect,
// keepHostSettings runs after it and overwrites Tracer,
// DefaultQueryExecMode, the cache capacities and ConnectTimeout with the
// pool configuration's (with a nil configuration: the defaults parsed from
// OldURL), so a pool's connections silently lose them; database/sql's keep
// them.
func TestSplitReviewPoolKeepsConfigBeforeConnectSettings(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	tracer := &rvTracer{}
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1",
		BeforeConnect: func(_ context.Context, cc *pgx.ConnConfig) error {
			cc.Tracer = tracer
			cc.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
			return nil
		}})
	ctx := testCtx(t)
	check := func(front string, conn *pgx.Conn) {
		t.Helper()
		cc := conn.Config()
		if cc.DefaultQueryExecMode != pgx.QueryExecModeSimpleProtocol || cc.Tracer != tracer {
			t.Errorf("%s: DefaultQueryExecMode = %v, tracer kept = %v; Config.BeforeConnect set simple_protocol and a tracer",
				front, cc.DefaultQueryExecMode, cc.Tracer == tracer)
		}
	}
	db := openDB(t, c)
	sc, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if err := sc.Raw(func(dc any) error {
		var pc *pgx.Conn
		switch d := dc.(type) {
		case *conn:
			pc = d.Conn.Conn()
		case *stdlib.Conn:
			pc = d.Conn()
		}
		check("database/sql", pc)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, mod := range []func(*pgxpool.Config){nil, func(*pgxpool.Config) {}} {
		pool := rvOpenPool(t, c, mod)
		pconn, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		front := "pool (nil configuration)"
		if mod != nil {
			front = "pool (configuration given)"
		}
		check(front, pconn.Conn())
		pconn.Release()
	}
}

type rvTracer struct{ n atomic.Int32 }

func (r *rvTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	r.n.Add(1)
	return ctx
}
func (r *rvTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// ---- Finding 4: the marker the stray check relies on can be lost ----

// TestReviewStraySessionsStayVisible: the leader refuses the switch when an
// application session is on the old database without the shared lock
// (strayApplicationSessions), finding application sessions by the
// "<namespace>:app" marker in application_name (RESET finds sync sessions
// the same way). Two ways lose the marker:
//
//   - OpenPool runs the host pool's BeforeConnect after swo has set
//     application_name, so a host hook that names its connections
//     (cc.RuntimeParams["application_name"] = ..., common practice) replaces
//     it (database/sql's Config.BeforeConnect cannot: adjust sets the name
//     after it);
//   - appName cuts "<URL's application_name> <marker>" to 63 bytes from the
//     end, so a URL application_name of 50+ bytes cuts the marker off.
//
// A session that lost the lock is then not seen, and the switch commits
// with it still connected to the old database.
func TestSplitReviewStraySessionsStayVisible(t *testing.T) {
	long := strings.Repeat("billing-api-eu-west-1-", 3) // 66 bytes
	for _, tcase := range []struct {
		name string
		mod  func(i int, cfg *Config)
		pool func(*pgxpool.Config)
	}{
		{name: "pool BeforeConnect names its connections", pool: func(pc *pgxpool.Config) {
			pc.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
				cc.RuntimeParams["application_name"] = "billing-api"
				return nil
			}
		}},
		{name: "long application_name in OldURL", mod: func(i int, cfg *Config) {
			cfg.OldURL += "&application_name=" + long
		}},
	} {
		t.Run(tcase.name, func(t *testing.T) {
			tc := newCluster(t, 1, false, tcase.mod)
			ctx := testCtx(t)
			c := tc.nodes[0]
			var pid int
			const unlock = "SELECT pg_backend_pid() FROM (SELECT pg_advisory_unlock_all()) u"
			if tcase.pool != nil {
				pool := rvOpenPool(t, c, tcase.pool)
				pconn, err := pool.Acquire(ctx)
				if err != nil {
					t.Fatal(err)
				}
				defer pconn.Release()
				if err := pconn.QueryRow(ctx, unlock).Scan(&pid); err != nil {
					t.Fatal(err)
				}
			} else {
				conn, err := tc.dbs[0].Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if err := conn.QueryRowContext(ctx, unlock).Scan(&pid); err != nil {
					t.Fatal(err)
				}
			}
			oc := pgtest.Connect(t, tc.old.URL)
			waitFor(t, func() bool {
				var old bool
				_ = oc.QueryRow(ctx, "SELECT backend_start < now() - interval '1.2 seconds' FROM pg_stat_activity WHERE pid = $1", pid).Scan(&old)
				return old
			})
			stray, err := c.listStraySessions(ctx, oc)
			if err != nil {
				t.Fatal(err)
			}
			if len(stray) == 0 {
				var app string
				_ = oc.QueryRow(ctx, "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid).Scan(&app)
				t.Fatalf("application session %d (application_name %q) lost the connection lock, and the stray check does not see it: "+
					"the switch would commit with it on the old database", pid, app)
			}
		})
	}
}

// ---- Finding 5: closed pools stay in the router's drain set ----

// TestReviewClosedPoolsAreForgotten: OpenPool registers every pool in
// router.pools and nothing ever removes it; a host that opens and closes
// pools (per tenant, per test, after a credentials rotation) leaks each
// one (its config, its hooks' closures, its puddle), and every later
// pause/switch calls Reset on all of them.
func TestSplitReviewClosedPoolsAreForgotten(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1"})
	ctx := testCtx(t)
	for i := 0; i < 20; i++ {
		p, err := c.OpenPool(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		p.Close()
	}
	runtime.GC()
	c.router.pause(time.Now().Add(time.Minute)) // a drain, where a fix may prune
	c.router.resume()
	c.router.mu.Lock()
	n := len(c.router.pools)
	c.router.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d closed pools still registered for the drain", n)
	}
}

// ---- Finding 6: OldURL's pool_* parameters ----

// TestReviewPoolParametersInOldURL: OpenPool's documentation says that with
// a nil configuration "the pool settings then come from OldURL's pool_*
// parameters". But dsn.Parse (pgx.ParseConfig) keeps pool_max_conns as a
// runtime parameter, which every connection (the node's own included) sends
// to the server: NewConnector fails with "unrecognized configuration
// parameter".
func TestSplitReviewPoolParametersInOldURL(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c, err := NewConnector(testCtx(t), Config{OldURL: old.URL + "&pool_max_conns=3", NextURL: next.URL, NodeName: "n1",
		Logger: testLogger(t), timing: testTimings})
	if err != nil {
		t.Fatalf("OldURL with pool_max_conns (documented for OpenPool): %v", err)
	}
	defer c.Close()
	p, err := c.OpenPool(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got := p.Config().MaxConns; got != 3 {
		t.Fatalf("pool MaxConns = %d, want 3 from OldURL", got)
	}
	var _ = errors.Is
	var _ = strings.Contains
}

// ---- Finding 7: Config.BeforeConnect's query exec mode reaches the library's own sessions ----

// TestReviewLibrarySessionsIgnoreTheHostsExecMode: adjust runs
// Config.BeforeConnect for every role and, for the library's own roles,
// restores only the runtime parameters. A hook that sets
// DefaultQueryExecMode to simple_protocol or exec (what a service behind
// PgBouncer, or one avoiding prepared statements, does) changes how the
// library encodes its own parameters: the heartbeat's jsonb status is sent
// as bytea text, the node's follow loop fails on every iteration ("invalid
// input syntax for type json"), the node never appears alive, and RESET and
// EXECUTE cannot run.
func TestSplitReviewLibrarySessionsIgnoreTheHostsExecMode(t *testing.T) {
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeExec} {
		t.Run(mode.String(), func(t *testing.T) {
			old := pgtest.NewDatabase(t)
			next := pgtest.NewDatabase(t)
			c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1",
				BeforeConnect: func(_ context.Context, cc *pgx.ConnConfig) error {
					cc.DefaultQueryExecMode = mode
					return nil
				}})
			ctx := testCtx(t)
			conn, err := c.connect(ctx, c.old, roleCtl)
			if err != nil {
				t.Fatal(err)
			}
			defer closeBounded(conn)
			if err := c.node.beat(ctx, conn, false); err != nil {
				t.Fatalf("the node's heartbeat on its own session: %v", err)
			}
		})
	}
}

// ---- Finding 8: the follow loop reconnects in a tight loop ----

// TestReviewFollowLoopBacksOffOnPersistentErrors: follow backs off only
// when connecting fails; when a connection succeeds and followOnce fails
// (any persistent error: the heartbeat of finding 7, a revoked privilege on
// the library's tables, a statement_timeout in OldURL shorter than a log
// read), it closes and reopens the control connection at once, forever:
// hundreds of connections a second to the old database from every node,
// and as many warnings in the log.
func TestSplitReviewFollowLoopBacksOffOnPersistentErrors(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	var connects atomic.Int32
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1",
		BeforeConnect: func(_ context.Context, cc *pgx.ConnConfig) error {
			connects.Add(1)
			return nil
		}})
	// A persistent error: the node's table is no longer writable.
	pgtest.Exec(t, old.AdminURL(), "ALTER TABLE swo.nodes ADD CONSTRAINT review_no_beat CHECK (false) NOT VALID")
	time.Sleep(500 * time.Millisecond)
	before := connects.Load()
	time.Sleep(2 * time.Second)
	if n := connects.Load() - before; n > 20 {
		t.Fatalf("%d connections to the old database in 2s from one idle node's follow loop (no backoff after a failed iteration)", n)
	}
	_ = c
}
