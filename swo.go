// Package swo moves a running Go service from one PostgreSQL database to
// another with no maintenance window: nothing written is lost and the service
// pauses for a moment its users do not notice.
//
// A service opens its *sql.DB through a Connector:
//
//	c, err := swo.NewConnector(ctx, swo.Config{OldURL: oldURL, NextURL: nextURL})
//	db := sql.OpenDB(c)
//
// With NextURL empty (normal mode) the connector is a thin pass-through to
// OldURL that refuses an obsolete database. With NextURL set (switchover
// mode) every instance of the service is a node of a switchover cluster; an
// operator then calls Reset and Execute (usually from an admin page), and
// every connector moves to the new database at the same instant.
//
// The story of a switchover, file by file:
//
//   - swo.go (this file): Config, the operator's flags and environment, the
//     constructor and Status.
//   - lock.go: the advisory locks, and the argument why no write can reach the
//     old database after the switch.
//   - driver.go: the Connector, which routes new connections to the old or the
//     new database and can pause them.
//   - conn.go: the connection wrapper, which lets the connector drain the old
//     database's connections without failing any query.
//   - state.go: the cluster's state machine.
//   - copy.go: the data sync (initial copy, change capture, incremental and
//     final sync).
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
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/msglog"
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
}

// ErrObsolete is returned (wrapped) by NewConnector and Connect when a database
// was switched away from: it must no longer be used.
var ErrObsolete = errors.New("swo: database is obsolete")

// ErrConfig is wrapped by configuration errors.
var ErrConfig = errors.New("swo: invalid configuration")

// ErrClosed is returned by Connect after Close.
var ErrClosed = errors.New("swo: connector closed")

var namespaceRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,30}$`)

// RegisterFlags registers --db-url and --db-url-next on fs, bound to
// c.OldURL and c.NextURL, with their current values as defaults (so call
// LoadEnv first if the environment should provide defaults).
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.OldURL, "db-url", c.OldURL, "PostgreSQL URL of the current database")
	fs.StringVar(&c.NextURL, "db-url-next", c.NextURL, "PostgreSQL URL of the database to switch over to (enables switchover mode)")
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
	return c
}

// parsed holds the validated connection settings.
type parsed struct {
	old, next *endpoint
}

func (c Config) parse() (parsed, error) {
	var p parsed
	if !namespaceRE.MatchString(c.Namespace) {
		return p, fmt.Errorf("%w: Namespace %q: use 1 to 31 lower-case letters, digits or _, not starting with a digit", ErrConfig, c.Namespace)
	}
	old, err := dsn.Parse("--db-url", c.OldURL)
	if err != nil {
		return p, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	p.old = &endpoint{cfg: old, label: "old"}
	if c.NextURL != "" {
		next, err := dsn.Parse("--db-url-next", c.NextURL)
		if err != nil {
			return p, fmt.Errorf("%w: %w", ErrConfig, err)
		}
		p.next = &endpoint{cfg: next, label: "next"}
	}
	return p, nil
}

// Errors of Reset and Execute that callers branch on.
var (
	// ErrNotReady: EXECUTE was refused (not after a successful RESET, or a
	// node's configuration is not valid); nothing was changed.
	ErrNotReady = errors.New("swo: not ready to execute")
	// ErrRunFailed: the execution failed; the service runs on the old
	// database. RESET, fix the cause, and EXECUTE again.
	ErrRunFailed = errors.New("swo: execution failed")
	// ErrResetFailed: RESET ran but a check failed; its text says what.
	ErrResetFailed = errors.New("swo: reset failed")
	// ErrDone: the switch is complete; there is nothing to reset.
	ErrDone = errors.New("swo: the switch is done")
)

// Reset is the operator's RESET: it cancels any run on every node, removes
// change capture, clears what a previous run wrote to the new database (and
// only that), re-checks every node and every precondition, and leaves the
// cluster idle. It returns nil when the cluster is idle, or an error that
// says exactly why not (wrapping ErrResetFailed, ErrPreconditions or
// ErrTargetNotEmpty).
func (c *Connector) Reset(ctx context.Context) error {
	if c.next == nil {
		return fmt.Errorf("%w: RESET needs --db-url-next", ErrConfig)
	}
	if c.route.Load().target != toOld {
		return fmt.Errorf("%w: restart the instances with --db-url pointing at the new database, without --db-url-next", ErrDone)
	}
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if info, _, err := c.meta.Read(ctx, conn); err == nil && info.Obsolete() {
		return fmt.Errorf("%w: restart the instances with --db-url pointing at the new database, without --db-url-next", ErrDone)
	}
	// A switch that committed since is caught under the log's lock: its
	// "done" (or the confirmations after it) is then the last message.
	m, err := c.msgs.Append(ctx, conn, c.id, msglog.KindReset, 0, resetData{}, func(last *msglog.Message) error {
		if last != nil && (last.Kind == msglog.KindDone || last.Kind == msglog.KindConfirm) {
			return ErrDone
		}
		return nil
	})
	if err != nil {
		return c.scrub(fmt.Errorf("swo: reset: %w", err))
	}
	c.resetting.Store(m.Run)
	defer c.resetting.CompareAndSwap(m.Run, 0)
	c.poke()
	c.log.Info("swo: RESET", "run", m.Run)
	resetErr := c.resetRun(ctx, conn)
	kind, data := msglog.KindIdle, any(nil)
	if resetErr != nil {
		resetErr = c.scrub(resetErr)
		kind, data = msglog.KindFailed, failedData{Error: resetErr.Error()}
	}
	_, err = c.msgs.Append(ctx, conn, c.id, kind, m.Run, data, func(last *msglog.Message) error {
		if last == nil || last.Run != m.Run || last.Kind != msglog.KindReset {
			return errors.New("another RESET started meanwhile")
		}
		return nil
	})
	c.poke()
	if resetErr != nil {
		return fmt.Errorf("%w: %w", ErrResetFailed, resetErr)
	}
	if err != nil {
		return c.scrub(fmt.Errorf("%w: %w", ErrResetFailed, err))
	}
	c.waitView(ctx, func(v view) bool { return v.Run != m.Run || v.State != StateResetting })
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
		c.log.Warn("swo: RESET ended the sessions of an unresponsive execution", "sessions", who)
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
	if err := c.nodes.Prune(ctx, conn, nodeTimeout); err != nil {
		return err
	}
	if err := c.beat(ctx, conn); err != nil {
		return err
	}
	if err := c.nodeProblems(); err != nil {
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
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE '%' || $1 || ':sync:%'`, c.cfg.Namespace)
		conn.Close(context.Background())
		if err != nil {
			return err
		}
	}
	return nil
}

// nodeProblems returns an error naming every alive node whose configuration
// is not valid.
func (c *Connector) nodeProblems() error {
	v, _ := c.currentView()
	probs := cluster.Problems(v.Nodes)
	var lines []string
	for _, n := range v.Nodes {
		if p := probs[n.ID]; p != "" {
			lines = append(lines, fmt.Sprintf("node %s: %s", n.Name, p))
		}
	}
	if len(lines) > 0 {
		return fmt.Errorf("%d node(s) with an invalid configuration:\n  %s", len(lines), strings.Join(lines, "\n  "))
	}
	return nil
}

// Execute is the operator's EXECUTE: it refuses unless the cluster is idle
// (after a RESET) and every node's configuration is valid; then one node
// leads (this one if it may execute) the copy, the sync, the pause and the
// switch. Execute returns nil once the new database is live on every node,
// or an error saying what failed (the service then runs on the old
// database: RESET and EXECUTE again). Cancelling ctx stops the waiting, not
// the execution; RESET cancels an execution.
func (c *Connector) Execute(ctx context.Context) error {
	if c.next == nil {
		return fmt.Errorf("%w: EXECUTE needs --db-url-next", ErrConfig)
	}
	if c.route.Load().target == toNext {
		return nil
	}
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if err := c.beat(ctx, conn); err != nil {
		return c.scrub(err)
	}
	if err := c.nodeProblems(); err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	v, _ := c.currentView()
	leader, err := cluster.Leader(v.Nodes, c.id)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	var state string
	m, err := c.msgs.Append(ctx, conn, c.id, msglog.KindExecute, 0, executeData{Leader: leader}, func(last *msglog.Message) error {
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
		return c.scrub(err)
	}
	c.poke()
	c.log.Info("swo: EXECUTE", "run", m.Run, "leader", nodeName(v.Nodes, leader))

	// Wait for the outcome.
	for {
		v, changed := c.currentView()
		switch {
		case v.Run != m.Run && v.LastID >= m.ID:
			return fmt.Errorf("%w: a RESET cancelled the execution", ErrRunFailed)
		case v.Run == m.Run && v.State == StateFailed:
			return fmt.Errorf("%w: %s", ErrRunFailed, v.Err)
		case v.Run == m.Run && v.State == StateDone:
			return c.awaitConfirmations(ctx, conn, m.Run)
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
	deadline := time.Now().Add(2 * nodeTimeout)
	for {
		nodes, err := c.nodes.List(ctx, conn, nodeTimeout)
		if err != nil {
			return c.scrub(err)
		}
		rows, err := conn.Query(ctx, "SELECT DISTINCT node FROM "+c.msgs.Table+" WHERE run = $1 AND kind = $2", run, msglog.KindConfirm)
		if err != nil {
			return c.scrub(err)
		}
		confirmed, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return c.scrub(err)
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
			return fmt.Errorf("swo: switched (the new database is live), but node(s) %s did not confirm within %v: check them",
				strings.Join(missing, ", "), 2*nodeTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitView waits (bounded by ctx) until cond holds for the local view.
func (c *Connector) waitView(ctx context.Context, cond func(view) bool) {
	for {
		v, changed := c.currentView()
		if cond(v) {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// Status is a snapshot of the connector and its cluster, for admin pages.
// Field names in JSON are stable.
type Status struct {
	// Mode is "normal" (no NextURL) or "switchover".
	Mode string `json:"mode"`
	// State is the cluster's state.
	State State `json:"state"`
	// Routing says where this node's new connections go: "old", "next", or
	// "refused" (the configured databases are obsolete).
	Routing string `json:"routing"`
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
	Routing     string    `json:"routing,omitempty"`
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
// leader's own measurement of the pause.
type Timings struct {
	ResetAt   *time.Time `json:"reset_at,omitempty"`
	ExecuteAt *time.Time `json:"execute_at,omitempty"`
	PauseAt   *time.Time `json:"pause_at,omitempty"`
	DoneAt    *time.Time `json:"done_at,omitempty"`
	FailedAt  *time.Time `json:"failed_at,omitempty"`
	// SyncMS is the copy and incremental sync, from EXECUTE to the pause.
	SyncMS int64 `json:"sync_ms,omitempty"`
	// PauseMS is the stop-the-world window measured by the leader (drain,
	// final sync, commit); FinalMS the final sync and commit within it.
	PauseMS int64 `json:"pause_ms,omitempty"`
	FinalMS int64 `json:"final_ms,omitempty"`
	// TotalMS is from EXECUTE to the switch.
	TotalMS int64 `json:"total_ms,omitempty"`
}

// Status returns a snapshot of this node and its cluster. It does not touch
// the databases: the node list and state are those of the last heartbeat
// and log read (at most a second old).
func (c *Connector) Status() Status {
	r := c.route.Load()
	s := Status{
		Mode:    "normal",
		Routing: r.String(),
		Paused:  r.paused != nil,
		Old:     dbStatus(c.old),
	}
	c.stateMu.Lock()
	s.Node = NodeStatus{
		ID: c.id.String(), Name: c.cfg.NodeName, Version: c.cfg.Version, CanExec: !c.cfg.APIOnly,
		OldID: idString(c.old.info.ID), Alive: true, LastSeen: time.Now(), Routing: s.Routing, Paused: s.Paused,
		LastError: errString(c.lastErr),
	}
	s.LastError = s.Node.LastError
	configErr := c.configErr
	c.stateMu.Unlock()
	if c.next == nil {
		return s
	}
	s.Mode = "switchover"
	next := dbStatus(c.next)
	s.Next = &next
	s.Node.NextID = idString(c.nextInfo().ID)
	s.Node.ConfigValid = configErr == nil
	s.Node.ConfigError = errString(configErr)

	v, _ := c.currentView()
	s.State = v.State
	if r.target != toOld {
		s.State = StateDone
		s.Old.Obsolete = true
	}
	if v.Err != "" {
		s.LastError = v.Err
	}
	probs := cluster.Problems(v.Nodes)
	for _, n := range v.Nodes {
		ns := NodeStatus{
			ID: n.ID.String(), Name: n.Name, Version: n.Version, CanExec: n.CanExec,
			ConfigValid: n.Alive && probs[n.ID] == "", ConfigError: probs[n.ID],
			OldID: idString(n.OldID), NextID: idString(n.NextID), Alive: n.Alive, LastSeen: n.SeenAt,
			Leader: n.ID == v.Leader && v.Leader != uuid.Nil,
		}
		if !n.Alive {
			ns.ConfigError = "not seen for more than " + nodeTimeout.String()
		}
		var rep nodeReport
		if json.Unmarshal(n.Status, &rep) == nil {
			ns.Routing, ns.Paused, ns.LastError = rep.Routing, rep.Paused, rep.LastError
			if ns.Leader && rep.Progress != nil && v.State.Running() {
				s.Progress = rep.Progress
			}
		}
		if n.ID == c.id {
			s.Node.ConfigValid = s.Node.ConfigValid && ns.ConfigValid
			s.Node.ConfigError = ns.ConfigError
			s.Node.Leader = ns.Leader
		}
		s.Nodes = append(s.Nodes, ns)
	}
	if p := c.leaderProgress(); p != nil {
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
