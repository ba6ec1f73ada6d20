// Package swo moves a running Go service from one PostgreSQL database to
// another with no maintenance window: nothing written is lost, and the
// service pauses for a moment its users do not notice.
//
// # Wiring
//
// Every instance of the service opens its database through a [Connector],
// configured with the current database and, for the time of a move, the
// next one:
//
//	var cfg swo.Config
//	cfg.LoadEnv("MYAPP")                // MYAPP_DB_URL, MYAPP_DB_URL_NEXT
//	cfg.RegisterFlags(flag.CommandLine) // --db-url, --db-url-next
//	flag.Parse()
//	c, err := swo.NewConnector(ctx, cfg)
//	db := sql.OpenDB(c)               // a database/sql service
//	pool, err := c.OpenPool(ctx, nil) // or a pgx-native one
//
// With NextURL empty (normal mode) the connector is a thin pass-through to
// OldURL that refuses a database that was switched away from. With NextURL
// set (switchover mode) every instance is a node of a switchover cluster.
// One connector may serve a *sql.DB and pgx pools at the same time.
//
// # Operating a switchover
//
// The host service exposes [Connector.Status], [Connector.Reset] and
// [Connector.Execute] on its admin surface (behind its own
// authentication). The operator's flow:
//
//  1. Start every instance with both URLs. Status lists every instance as
//     a node; each must show a valid configuration.
//  2. RESET ([Connector.Reset]) cancels anything in progress, removes change
//     tracking, and checks every node and every precondition.
//  3. EXECUTE ([Connector.Execute]) runs the switchover and returns once
//     every instance uses the new database. If it fails, the service is
//     still on the old database: RESET and EXECUTE again.
//  4. Restart the instances with the new database as their only URL. The
//     old database is obsolete: an instance pointed at it refuses to start
//     ([ErrObsolete]).
//
// Before a successful EXECUTE, rolling back is RESET, then restarting with
// the old URL only.
//
// [Check] is the dry run: it makes every check RESET makes, changes
// neither database, and lists every problem (run it in the service's CI
// after each migration). [Connector.Verify] compares the two databases
// table by table. The role of the URLs needs, in each database, CREATE on
// the database (or an empty schema an administrator created for it,
// named Config.Namespace), and in the old one ownership of the moved
// tables (capture installs triggers on them). What cannot be moved (large
// objects, prepared transactions, tables without a primary key, …) is
// refused by name; docs/inventory.md in the repository lists every kind of
// object and what happens to it, and docs/operator-guide.md every error.
//
// # What a run does
//
// One node leads the run. It installs change capture (triggers) on the old
// database, copies every table in parallel from one snapshot, and applies
// the captured changes in rounds while the service works normally. Then it
// opens the window: every node's new connections wait (they do not fail),
// the old database's connections are closed as soon as they are idle, the
// last changes are applied, and one transaction on the old database commits
// the switch and marks the database obsolete. Waiting connections continue
// on the new database. The window lasts tens of milliseconds, bounded by
// Config.PauseBudget and Config.FinalTimeout; if the service's transactions
// do not finish within the budget, the run aborts ([ErrPauseBudget]) and
// the service carries on with the old database.
//
// # Guarantees
//
// No write reaches the old database after the switch, and none reaches the
// new one before it: every application connection to the old database holds
// a shared advisory lock for its whole life, and the switch commits while
// the leader holds that lock exclusively. After the switch the old database
// refuses writes itself, not only through well-behaved clients. Every
// acknowledged write is in the database that is live afterwards, whatever
// node, database or network fails, and at any moment. What the database
// holds is moved exactly, or refused by the preconditions with an error
// naming the objects ([PreconditionError]).
//
// # Connections the application holds
//
// Do not hold a connection from the connector across a switchover (a
// *sql.Conn, a raw pgx connection, an acquired pool connection kept for
// minutes): the switch waits for it within the pause budget. Do not call
// pg_advisory_unlock_all or DISCARD ALL on them, and reach the old database
// through a session-mode pooler, if any: they would drop the shared lock.
// Hooks for the host's own connection set-up are [Config.BeforeConnect] and
// [Config.AfterConnect].
package swo

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/meta"
	"github.com/pgswo/swo/internal/msglog"
	"github.com/pgswo/swo/internal/replicate"
)

// Config configures a Connector. Only OldURL is required; every other field
// has a safe zero value.
type Config struct {
	// OldURL is the current database (--db-url).
	OldURL string
	// NextURL is the database to switch to (--db-url-next); empty means normal mode.
	NextURL string

	// Namespace names the library's schema in each database and seeds its
	// advisory lock keys. Default "swo". Every instance of a service must use
	// the same namespace.
	Namespace string
	// NodeName is this instance's name on the switchover page. Default: host name and process id.
	NodeName string
	// Version is this instance's version on the switchover page. Default: the
	// main module's version from the build information.
	Version string
	// APIOnly marks an instance that never leads an execution (it still
	// follows the switch).
	APIOnly bool
	// Logger receives structured logs. Default slog.Default().
	Logger *slog.Logger

	// ExcludeTables lists tables that are not moved: "schema.table", where
	// either part may be "*"; a bare name matches that table in any schema.
	// Foreign keys between excluded and moved tables are refused.
	ExcludeTables []string
	// AllowClearTarget lets RESET and EXECUTE clear tables of the new
	// database that hold rows differing from the old database's. By default
	// such a target is refused, naming the tables.
	AllowClearTarget bool
	// SyncWorkers is the number of parallel copy streams. Default 4.
	SyncWorkers int
	// CaptureTimeout bounds the wait for the application's transactions when
	// change capture is installed or removed. Default 30s.
	CaptureTimeout time.Duration
	// PauseBudget bounds the wait, during EXECUTE, for the application's
	// in-flight transactions on the old database to finish. If they do not
	// within it, the run aborts and the service carries on with the old
	// database. Default 3s.
	PauseBudget time.Duration
	// FinalTimeout bounds the final sync and the commit of the switch,
	// during which new connections wait. Default 10s.
	FinalTimeout time.Duration
	// BeforeConnect, if set, adjusts the pgx settings of every connection
	// the connector opens, before it is dialled: a tracer, TLS settings, a
	// dialer, runtime parameters, a password that changes (a cloud
	// provider's token). It may not change where a connection goes (host,
	// port, database, user). Runtime parameters it sets apply to the
	// application's connections, except application_name, which carries
	// swo's marker (set it in the URL: swo appends its marker to it); the
	// library's own sessions keep the URL's parameters.
	BeforeConnect func(ctx context.Context, cfg *pgx.ConnConfig) error
	// AfterConnect, if set, runs on every new application connection of
	// either front end, after the connector has taken its lock and read the
	// switch state on it and before the application uses it: register
	// custom types here. An error fails the connection.
	AfterConnect func(ctx context.Context, conn *pgx.Conn) error

	// timing of heartbeats and liveness (tests shorten it).
	timing timings
}

var namespaceRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,30}$`)

// RegisterFlags registers --db-url and --db-url-next on fs, bound to
// c.OldURL and c.NextURL, with their current values as defaults (so call
// LoadEnv first if the environment should provide defaults). The usage text
// (-h) shows the defaults without their passwords.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.Var((*urlFlag)(&c.OldURL), "db-url", "PostgreSQL URL of the current database")
	fs.Var((*urlFlag)(&c.NextURL), "db-url-next", "PostgreSQL URL of the database to switch over to (enables switchover mode)")
}

// urlFlag is a database URL as a flag: set as given, shown redacted.
type urlFlag string

func (u *urlFlag) String() string {
	if u == nil || *u == "" {
		return ""
	}
	return dsn.Redact(string(*u))
}

func (u *urlFlag) Set(v string) error {
	*u = urlFlag(v)
	return nil
}

// LoadEnv sets OldURL and NextURL from PREFIX_DB_URL and PREFIX_DB_URL_NEXT
// when those are set and not empty. prefix is the host application's, for
// example "MYAPP" (a trailing underscore is optional).
func (c *Config) LoadEnv(prefix string) {
	if prefix != "" && prefix[len(prefix)-1] != '_' {
		prefix += "_"
	}
	if v := os.Getenv(prefix + "DB_URL"); v != "" {
		c.OldURL = v
	}
	if v := os.Getenv(prefix + "DB_URL_NEXT"); v != "" {
		c.NextURL = v
	}
}

// Validate checks the configuration without connecting. Its errors wrap
// ErrConfig and never contain a password.
func (c Config) Validate() error {
	_, err := c.withDefaults().parse()
	return err
}

func (c Config) withDefaults() Config {
	if c.Namespace == "" {
		c.Namespace = "swo"
	}
	if c.NodeName == "" {
		host, _ := os.Hostname()
		c.NodeName = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if c.Version == "" {
		c.Version = "(devel)"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
			c.Version = bi.Main.Version
		}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.PauseBudget <= 0 {
		c.PauseBudget = 3 * time.Second
	}
	if c.FinalTimeout <= 0 {
		c.FinalTimeout = 10 * time.Second
	}
	if c.CaptureTimeout <= 0 {
		c.CaptureTimeout = 30 * time.Second
	}
	if c.timing == (timings{}) {
		c.timing = defaultTimings
	}
	return c
}

// agreed renders the settings every node of a cluster must share: what
// moves and whether the new database may be cleared are the leader's to
// apply, and must not depend on which node leads. Nodes compare it through
// their heartbeats.
func (c Config) agreed() string {
	ex := slices.Clone(c.ExcludeTables)
	slices.Sort(ex)
	return fmt.Sprintf("ExcludeTables=%q AllowClearTarget=%v", ex, c.AllowClearTarget)
}

// parsed holds the validated connection settings.
type parsed struct {
	old, next *endpoint
	redactor
}

func (c Config) parse() (parsed, error) {
	var p parsed
	if !namespaceRE.MatchString(c.Namespace) {
		return p, fmt.Errorf("swo: %w: Config.Namespace %q: use 1 to 31 lower-case letters, digits or _, not starting with a digit", ErrConfig, c.Namespace)
	}
	old, err := dsn.Parse("Config.OldURL (--db-url)", c.OldURL)
	if err != nil {
		return p, fmt.Errorf("swo: %w: %w", ErrConfig, err)
	}
	p.old = &endpoint{url: old, label: "old"}
	p.passwords = []string{old.Password}
	if c.NextURL != "" {
		next, err := dsn.Parse("Config.NextURL (--db-url-next)", c.NextURL)
		if err != nil {
			return p, fmt.Errorf("swo: %w: %w", ErrConfig, err)
		}
		p.next = &endpoint{url: next, label: "next"}
		p.passwords = append(p.passwords, next.Password)
	}
	return p, nil
}

// Connector is the service's way to its database: a database/sql
// driver.Connector (open the *sql.DB with sql.OpenDB(connector)) and a
// source of pgx pools ([Connector.OpenPool]). In switchover mode it is also
// this instance's node of the switchover cluster and the operator's handle
// on it ([Connector.Reset], [Connector.Execute], [Connector.Status]).
//
// A Connector is made of three parts, each with its own state and
// goroutines: the router (where new connections go; driver.go, conn.go,
// pool.go), the node (membership and the cluster's state; state.go) and the
// leader (the runs this node leads; copy.go). The Connector itself only
// wires them and holds the operator's commands.
type Connector struct {
	*common
	router *router
	node   *node   // nil in normal mode
	leader *leader // nil in normal mode
	drv    *Driver

	closed atomic.Bool
	cancel context.CancelFunc
	bg     sync.WaitGroup
}

// NewConnector checks the configuration, connects to the configured
// databases, and returns a connector. In switchover mode it creates the
// library's schema in both databases if needed and joins the cluster.
//
// It fails with an error wrapping ErrObsolete when OldURL names a database
// that was switched away from (in switchover mode: unless NextURL is the
// database it was switched to, which is then used), or NextURL names one.
func NewConnector(ctx context.Context, cfg Config) (*Connector, error) {
	s, err := newCommon(cfg)
	if err != nil {
		return nil, err
	}
	cfg = s.cfg
	c := &Connector{common: s, router: newRouter(s)}
	c.drv = &Driver{c: c}
	bgCtx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	if c.next == nil {
		err = c.startNormal(ctx)
	} else {
		c.leader = &leader{common: s}
		c.node = newNode(s, cfg.timing, c.router, c.leader)
		c.leader.node = c.node
		var conn *pgx.Conn
		conn, err = c.node.join(ctx)
		switch {
		case err == nil && conn != nil:
			c.bg.Add(1)
			go func() {
				defer c.bg.Done()
				c.node.follow(bgCtx, conn)
			}()
		case err == nil:
			// Already switched: validations the run left (its leader died
			// right after the commit) are done here.
			c.bg.Add(1)
			go func() {
				defer c.bg.Done()
				c.node.finishLeftovers(bgCtx)
			}()
		}
	}
	if err != nil {
		c.closed.Store(true)
		c.router.close()
		cancel()
		c.bg.Wait()
		return nil, c.public(err)
	}
	return c, nil
}

// startNormal refuses an obsolete database in normal mode.
func (c *Connector) startNormal(ctx context.Context) error {
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	defer closeBounded(conn)
	info, ok, err := c.meta.Read(ctx, conn)
	if errors.Is(err, meta.ErrForeignSchema) {
		// The application's own schema of that name: in normal mode the
		// library creates nothing, so it is no concern (switchover mode
		// refuses it, and asks for another Config.Namespace).
		return nil
	}
	if err != nil {
		return fmt.Errorf("read the state of %s: %w", c.old.describe(), err)
	}
	c.old.setInfo(info)
	if ok && info.Obsolete() {
		return c.obsolete(c.old, info)
	}
	return nil
}

// Close stops the connector's background work. database/sql calls it from
// DB.Close; close the connector's pools before it. Connect and the pools'
// new connections fail with ErrClosed afterwards.
func (c *Connector) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	if c.leader != nil {
		c.leader.close()
	}
	c.cancel()
	c.bg.Wait()
	c.router.close()
	if c.node != nil && c.router.route.Load().target == toOld {
		// Leave the node list at once rather than by timeout.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if conn, err := c.connect(ctx, c.old, roleCtl); err == nil {
			_ = c.node.table.Remove(ctx, conn, c.node.id)
			closeBounded(conn)
		}
	}
	return nil
}

// Reset is the operator's RESET: it cancels any run on every node, removes
// change capture, clears what a previous run wrote to the new database (and
// only that), re-checks every node and every precondition, and leaves the
// cluster idle. It returns nil when the cluster is idle, or an error that
// says exactly why not (wrapping ErrResetFailed, and ErrPreconditions or
// ErrTargetNotEmpty when those are the cause).
func (c *Connector) Reset(ctx context.Context) error {
	return c.public(c.reset(ctx))
}

func (c *Connector) reset(ctx context.Context) error {
	if c.node == nil {
		return fmt.Errorf("%w: RESET needs NextURL (--db-url-next)", ErrConfig)
	}
	if c.router.route.Load().target != toOld {
		return fmt.Errorf("%w: restart the instances with OldURL (--db-url) pointing at the new database, without NextURL (--db-url-next)", ErrDone)
	}
	n := c.node
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	defer closeBounded(conn)
	if info, _, err := c.meta.Read(ctx, conn); err == nil && info.Obsolete() {
		return fmt.Errorf("%w: restart the instances with OldURL (--db-url) pointing at the new database, without NextURL (--db-url-next)", ErrDone)
	}
	// A switch that committed since is caught under the log's lock: its
	// "done" (or the confirmations after it) is then the last message.
	m, err := n.msgs.Append(ctx, conn, n.id, msglog.KindReset, 0, resetData{}, func(last *msglog.Message) error {
		if last != nil && (last.Kind == msglog.KindDone || last.Kind == msglog.KindConfirm) {
			return ErrDone
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("reset: %w", err)
	}
	n.resetting.Store(m.Run)
	defer n.resetting.CompareAndSwap(m.Run, 0)
	n.poke()
	c.log.Info("RESET", "run", m.Run)
	resetErr := c.resetRun(ctx, conn)
	kind, data := msglog.KindIdle, any(nil)
	if resetErr != nil {
		resetErr = c.scrub(resetErr)
		kind, data = msglog.KindFailed, encodeFailure(resetErr)
	}
	_, err = n.msgs.Append(ctx, conn, n.id, kind, m.Run, data, func(last *msglog.Message) error {
		if last == nil || last.Run != m.Run || last.Kind != msglog.KindReset {
			return errors.New("another RESET started meanwhile")
		}
		return nil
	})
	n.poke()
	if resetErr != nil {
		return fmt.Errorf("%w: %w", ErrResetFailed, resetErr)
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrResetFailed, err)
	}
	n.waitView(ctx, func(v view) bool { return v.Run != m.Run || v.State != StateResetting })
	return nil
}

// resetRun is RESET's work, under the exec lock: a leader still running
// stops when it sees the reset (its sessions end and release the lock); one
// that stopped answering has its sessions ended.
func (c *Connector) resetRun(ctx context.Context, conn *pgx.Conn) error {
	err := c.keys.lockExclusive(ctx, conn, lockExec, 15*time.Second)
	if errors.Is(err, errLockTimeout) {
		who := c.keys.holders(ctx, conn, lockExec)
		if _, err := c.keys.terminateExclusiveHolders(ctx, conn, lockExec); err != nil {
			return fmt.Errorf("the execution lock is held by %s and could not be taken over: %w", who, err)
		}
		c.log.Warn("RESET ended the sessions of an unresponsive execution", "sessions", who)
		err = c.keys.lockExclusive(ctx, conn, lockExec, 15*time.Second)
	}
	if err != nil {
		return fmt.Errorf("take the execution lock: %w", err)
	}
	defer c.keys.unlock(context.Background(), conn, lockExec) //nolint:errcheck
	if err := c.endStraySyncSessions(ctx); err != nil {
		return err
	}
	if err := c.cleanup(ctx); err != nil {
		return fmt.Errorf("clean up: %w", err)
	}
	if err := c.node.table.Prune(ctx, conn, c.node.timing.timeout); err != nil {
		return err
	}
	if err := c.node.beat(ctx, conn, true); err != nil {
		return err
	}
	if err := c.node.problems(); err != nil {
		return err
	}
	r, err := c.check(ctx)
	if err != nil {
		return err
	}
	return r.checkTarget(ctx)
}

// endStraySyncSessions ends sync sessions left by a stopped leader (a
// backend may run on, building an index, after its client went away), so
// that cleanup does not wait behind them. Under the exec lock, no sync
// session is legitimately running.
func (c *Connector) endStraySyncSessions(ctx context.Context) error {
	for _, e := range []*endpoint{c.old, c.next} {
		conn, err := c.connect(ctx, e, roleCtl)
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name ~ $1`, c.sessionsOf(roleSync))
		closeBounded(conn)
		if err != nil {
			return err
		}
	}
	return nil
}

// Execute is the operator's EXECUTE: it refuses unless the cluster is idle
// (after a RESET) and every node's configuration is valid; then one node
// leads the run (this one if it may execute): the copy, the sync, the window
// and the switch. Execute returns nil once the new database is live on every
// node, or an error saying what failed (the service then runs on the old
// database: RESET and EXECUTE again), or, when the switch committed but not
// every alive node was seen to confirm it, an error that errors.Is
// ErrUnconfirmed (nothing to undo: check the nodes it names). A failure
// keeps its identity whichever node led: errors.Is(err, ErrPauseBudget) and
// errors.As(err, *PreconditionError) work here. Cancelling ctx stops the
// waiting, not the run; RESET cancels a run.
func (c *Connector) Execute(ctx context.Context) error {
	return c.public(c.execute(ctx))
}

func (c *Connector) execute(ctx context.Context) error {
	if c.node == nil {
		return fmt.Errorf("%w: EXECUTE needs NextURL (--db-url-next)", ErrConfig)
	}
	if c.router.route.Load().target == toNext {
		return nil
	}
	n := c.node
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	defer closeBounded(conn)
	if err := n.beat(ctx, conn, true); err != nil {
		return err
	}
	if err := n.problems(); err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	v, _ := n.currentView()
	leader, err := cluster.Leader(v.Nodes, n.id)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	var state string
	m, err := n.msgs.Append(ctx, conn, n.id, msglog.KindExecute, 0, executeData{Leader: leader}, func(last *msglog.Message) error {
		if last == nil || last.Kind != msglog.KindIdle {
			state = "no RESET yet"
			if last != nil {
				state = "last event: " + last.Kind
			}
			return errors.New(state)
		}
		return nil
	})
	if errors.Is(err, msglog.ErrRefused) {
		return fmt.Errorf("%w: EXECUTE needs a successful RESET first (%s)", ErrNotReady, state)
	}
	if err != nil {
		return err
	}
	n.poke()
	c.log.Info("EXECUTE", "run", m.Run, "leader", nodeName(v.Nodes, leader))

	// Wait for the outcome.
	for {
		v, changed := n.currentView()
		switch {
		case v.Run != m.Run && v.LastID >= m.ID:
			return fmt.Errorf("%w: a RESET cancelled the execution", ErrRunFailed)
		case v.Run == m.Run && v.State == StateFailed:
			return fmt.Errorf("%w: %w", ErrRunFailed, v.Err.err())
		case v.Run == m.Run && v.State == StateDone:
			if err := c.awaitConfirmations(ctx, conn, m.Run); err != nil && !errors.Is(err, ErrUnconfirmed) {
				return fmt.Errorf("%w: the new database is live, but the other nodes' confirmations could not be read from the old database: %w", ErrUnconfirmed, err)
			} else if err != nil {
				return err
			}
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// awaitConfirmations waits until every alive node says it routes to the new
// database; a node that stops answering meanwhile is not waited for.
func (c *Connector) awaitConfirmations(ctx context.Context, conn *pgx.Conn, run int64) error {
	timeout := c.node.timing.timeout
	deadline := time.Now().Add(2 * timeout)
	for {
		nodes, err := c.node.table.List(ctx, conn, timeout)
		if err != nil {
			return err
		}
		c.node.setNodes(nodes)
		rows, err := conn.Query(ctx, "SELECT DISTINCT node FROM "+c.node.msgs.Table+" WHERE run = $1 AND kind = $2", run, msglog.KindConfirm)
		if err != nil {
			return err
		}
		confirmed, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return err
		}
		var missing []string
		for _, n := range nodes {
			if n.Alive && !slices.Contains(confirmed, n.ID) {
				missing = append(missing, n.Name)
			}
		}
		if len(missing) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: the new database is live, but node(s) %s did not confirm within %v: check them",
				ErrUnconfirmed, strings.Join(missing, ", "), 2*timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ---- Status ----

// Mode says whether a connector is a plain pass-through or a node of a
// switchover.
type Mode string

// The modes.
const (
	ModeNormal     Mode = "normal"     // no NextURL: a pass-through to OldURL
	ModeSwitchover Mode = "switchover" // NextURL set: a node of the switchover cluster
)

// Routing says where a node's new connections go.
type Routing string

// The routings.
const (
	RoutingOld     Routing = "old"     // to OldURL
	RoutingNext    Routing = "next"    // to NextURL: the switch is done
	RoutingRefused Routing = "refused" // nowhere: the configured databases are obsolete
)

// Phase is the part of a run under way, as Progress reports it.
type Phase string

// The phases, in the order of a run.
const (
	PhaseInitialCopy     Phase = "initial copy"               // tables copied in parallel from one snapshot
	PhaseRebuildIndexes  Phase = "rebuild indexes"            // the new database's indexes and keys, dropped for the load
	PhaseRefreshMatViews Phase = "refresh materialized views" // computed in the new database
	PhaseIncremental     Phase = "incremental sync"           // rounds of captured changes
	PhasePausing         Phase = "pausing"                    // the window: waiting for the old database's connections
	PhaseFinalSync       Phase = "final sync"                 // the window: last round and commit
	PhaseSealing         Phase = "sealing the old database"   // after the switch: sequences, partitions
	PhaseValidating      Phase = "validating foreign keys"    // after the switch, in the new database
	PhaseDone            Phase = "done"
)

// Status is a snapshot of the connector and its cluster, for admin pages.
// Field names in JSON are stable; every duration is in milliseconds.
type Status struct {
	// Mode is normal (no NextURL) or switchover.
	Mode Mode `json:"mode"`
	// State is the cluster's state.
	State State `json:"state"`
	// Routing says where this node's new connections go.
	Routing Routing `json:"routing"`
	// Paused is true while this node's new connections wait for the switch.
	Paused bool `json:"paused"`
	// Node is this instance; Nodes every instance of the cluster.
	Node  NodeStatus   `json:"node"`
	Nodes []NodeStatus `json:"nodes,omitempty"`
	// Old and Next describe the configured databases (Next is nil in normal mode).
	Old  DatabaseStatus  `json:"old"`
	Next *DatabaseStatus `json:"next,omitempty"`
	// Progress of the running phase (copy, sync, …), from the leading node.
	Progress *Progress `json:"progress,omitempty"`
	// Timings of the last run.
	Timings Timings `json:"timings"`
	// LastError is why the last run failed, or the last error this node saw.
	LastError string `json:"last_error,omitempty"`
	// LastErrorCode names the kind of the last run's failure, whichever
	// node met it: "pause_budget", "preconditions", "target_not_empty",
	// "obsolete", "config", … ("" when unknown). It is stable: pages may
	// branch on it as Go code branches with errors.Is.
	LastErrorCode string `json:"last_error_code,omitempty"`
	// Problems lists the problems of a failure of the preconditions.
	Problems []Problem `json:"problems,omitempty"`
}

// NodeStatus describes one node (service instance in switchover mode).
type NodeStatus struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	Version     string `json:"version"`
	CanExec     bool   `json:"can_exec"`
	ConfigValid bool   `json:"config_valid"`
	// ConfigError says why the configuration is not valid.
	ConfigError string    `json:"config_error,omitempty"`
	OldID       string    `json:"old_db_id,omitempty"`
	NextID      string    `json:"next_db_id,omitempty"`
	Alive       bool      `json:"alive"`
	LastSeen    time.Time `json:"last_seen"`
	Routing     Routing   `json:"routing,omitempty"`
	Paused      bool      `json:"paused"`
	Leader      bool      `json:"leader"`
	LastError   string    `json:"last_error,omitempty"`
}

// DatabaseStatus describes one configured database. Addr never contains a password.
type DatabaseStatus struct {
	Addr     string `json:"addr"`
	ID       string `json:"id,omitempty"`
	Obsolete bool   `json:"obsolete"`
}

// Timings of a run, from the message log (the old database's clock) and the
// leader's own measurement of the window.
type Timings struct {
	ResetAt   *time.Time `json:"reset_at,omitempty"`
	ExecuteAt *time.Time `json:"execute_at,omitempty"`
	PauseAt   *time.Time `json:"pause_at,omitempty"`
	DoneAt    *time.Time `json:"done_at,omitempty"`
	FailedAt  *time.Time `json:"failed_at,omitempty"`
	// SyncMS is the sync: from EXECUTE to the pause.
	SyncMS int64 `json:"sync_ms,omitempty"`
	// PauseMS is the window as the leader measured it (drain, final sync,
	// commit); FinalMS the final sync and commit within it.
	PauseMS int64 `json:"pause_ms,omitempty"`
	FinalMS int64 `json:"final_ms,omitempty"`
	// TotalMS is from EXECUTE to the switch.
	TotalMS int64 `json:"total_ms,omitempty"`
}

// Progress is the progress of a run's current phase. Totals are estimates
// (0 when unknown).
//
// What RowsDone and RowsTotal count depends on the phase: rows in
// PhaseInitialCopy (the total from the planner's estimates), captured
// changes in PhaseIncremental (the total is the backlog seen by the last
// round, so it moves), indexes and key constraints in PhaseRebuildIndexes
// (the phase starts when the copy ends, counting as done those rebuilt
// beside the copy), materialized views in PhaseRefreshMatViews, and foreign keys in
// PhaseValidating. The other phases count nothing. Bytes are counted in
// PhaseInitialCopy only: BytesDone is the COPY text streamed, BytesTotal the
// tables' size on disk (close, not the same measure).
type Progress struct {
	Phase      Phase   `json:"phase"`
	Table      string  `json:"table,omitempty"` // the table being worked on, schema.name
	RowsDone   int64   `json:"rows_done"`
	RowsTotal  int64   `json:"rows_total"`
	BytesDone  int64   `json:"bytes_done"`
	BytesTotal int64   `json:"bytes_total"`
	RowsPerSec float64 `json:"rows_per_sec"` // RowsDone per second of the phase
	ElapsedMS  int64   `json:"elapsed_ms"`   // since the phase started
	ETAMS      int64   `json:"eta_ms"`       // 0 when unknown
}

func progressOf(s replicate.Snapshot) Progress {
	return Progress{Phase: Phase(s.Phase), Table: s.Table, RowsDone: s.RowsDone, RowsTotal: s.RowsTotal,
		BytesDone: s.BytesDone, BytesTotal: s.BytesTotal, RowsPerSec: s.RowsPerSec,
		ElapsedMS: s.Elapsed.Milliseconds(), ETAMS: s.ETA.Milliseconds()}
}

// VerifyReport is the result of Verify.
type VerifyReport struct {
	Tables    []TableCheck    `json:"tables"`
	Sequences []SequenceCheck `json:"sequences"`
	Equal     bool            `json:"equal"` // every table and sequence equal
}

// TableCheck compares one table between the two databases.
type TableCheck struct {
	Table     string `json:"table"`
	OldRows   int64  `json:"old_rows"`
	NewRows   int64  `json:"new_rows"`
	OldDigest string `json:"old_digest"`
	NewDigest string `json:"new_digest"`
	Equal     bool   `json:"equal"`
}

// SequenceCheck compares one sequence's state between the two databases.
type SequenceCheck struct {
	Sequence string `json:"sequence"`
	Old      string `json:"old"` // "next value 43"
	New      string `json:"new"`
	Equal    bool   `json:"equal"`
}

// Differences lists the tables that differ.
func (r VerifyReport) Differences() []TableCheck {
	var out []TableCheck
	for _, t := range r.Tables {
		if !t.Equal {
			out = append(out, t)
		}
	}
	return out
}

func (r VerifyReport) String() string { return r.internal().String() }

func (r VerifyReport) internal() replicate.Report {
	out := replicate.Report{Equal: r.Equal}
	for _, t := range r.Tables {
		out.Tables = append(out.Tables, replicate.TableCheck(t))
	}
	for _, s := range r.Sequences {
		out.Sequences = append(out.Sequences, replicate.SequenceCheck(s))
	}
	return out
}

func verifyReport(r replicate.Report) VerifyReport {
	out := VerifyReport{Equal: r.Equal}
	for _, t := range r.Tables {
		out.Tables = append(out.Tables, TableCheck(t))
	}
	for _, s := range r.Sequences {
		out.Sequences = append(out.Sequences, SequenceCheck(s))
	}
	return out
}

// Status returns a snapshot of this node and its cluster. It does not touch
// the databases: the node list and state are those of the last heartbeat
// and log read (at most a second old).
func (c *Connector) Status() Status {
	routing, paused := c.router.report()
	s := Status{Mode: ModeNormal, Routing: routing, Paused: paused, Old: dbStatus(c.old)}
	s.Node = NodeStatus{ID: "", Name: c.cfg.NodeName, Version: c.cfg.Version, CanExec: !c.cfg.APIOnly,
		OldID: idString(c.old.Info().ID), Alive: true, LastSeen: time.Now(), Routing: routing, Paused: paused}
	if c.node == nil {
		s.Node.ConfigValid = true // a plain pass-through has nothing to agree on
		return s
	}
	n := c.node
	configErr, lastErr := n.errs()
	s.Node.ID = n.id.String()
	s.Node.LastError = errString(lastErr)
	s.LastError = s.Node.LastError
	s.Mode = ModeSwitchover
	next := dbStatus(c.next)
	s.Next = &next
	s.Node.NextID = idString(c.next.Info().ID)
	s.Node.ConfigValid = configErr == nil
	s.Node.ConfigError = errString(configErr)

	v, _ := n.currentView()
	s.State = v.State
	if routing != RoutingOld {
		s.State = StateDone
		s.Old.Obsolete = true
	}
	if v.Err.Error != "" {
		s.LastError, s.LastErrorCode, s.Problems = v.Err.Error, v.Err.Code, v.Err.Problems
	}
	probs := cluster.Problems(v.Nodes)
	for _, cn := range v.Nodes {
		ns := NodeStatus{
			ID: cn.ID.String(), Name: cn.Name, Version: cn.Version, CanExec: cn.CanExec,
			ConfigValid: cn.Alive && probs[cn.ID] == "", ConfigError: probs[cn.ID],
			OldID: idString(cn.OldID), NextID: idString(cn.NextID), Alive: cn.Alive, LastSeen: cn.SeenAt,
			Leader: cn.ID == v.Leader && v.Leader != uuid.Nil,
		}
		if !cn.Alive {
			ns.ConfigError = "not seen for more than " + n.timing.timeout.String()
		}
		var rep nodeReport
		if json.Unmarshal(cn.Status, &rep) == nil {
			ns.Routing, ns.Paused, ns.LastError = rep.Routing, rep.Paused, rep.LastError
			if ns.Leader && rep.Progress != nil && v.State.Running() {
				s.Progress = rep.Progress
			}
		}
		if cn.ID == n.id {
			s.Node.ConfigValid = s.Node.ConfigValid && ns.ConfigValid
			s.Node.ConfigError = ns.ConfigError
			s.Node.Leader = ns.Leader
		}
		s.Nodes = append(s.Nodes, ns)
	}
	if p := c.leader.progress(); p != nil {
		s.Progress = p
	}
	at := func(kind string) *time.Time {
		if t, ok := v.At[kind]; ok {
			return &t
		}
		return nil
	}
	s.Timings = Timings{ResetAt: at(msglog.KindReset), ExecuteAt: at(msglog.KindExecute), PauseAt: at(msglog.KindPause),
		DoneAt: at(msglog.KindDone), FailedAt: at(msglog.KindFailed), PauseMS: v.Done.PauseMS, FinalMS: v.Done.FinalMS}
	if s.Timings.ExecuteAt != nil && s.Timings.PauseAt != nil {
		s.Timings.SyncMS = s.Timings.PauseAt.Sub(*s.Timings.ExecuteAt).Milliseconds()
	}
	if s.Timings.ExecuteAt != nil && s.Timings.DoneAt != nil {
		s.Timings.TotalMS = s.Timings.DoneAt.Sub(*s.Timings.ExecuteAt).Milliseconds()
	}
	return s
}

func dbStatus(e *endpoint) DatabaseStatus {
	info := e.Info()
	return DatabaseStatus{Addr: e.describe(), ID: idString(info.ID), Obsolete: info.Obsolete()}
}

func idString(id uuid.UUID) string {
	if id == uuid.Nil {
		return ""
	}
	return id.String()
}
