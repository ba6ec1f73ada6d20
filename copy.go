package swo

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgswo/swo/internal/capture"
	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/meta"
	"github.com/pgswo/swo/internal/msglog"
	"github.com/pgswo/swo/internal/replicate"
	"github.com/pgswo/swo/internal/schema"
)

// Data sync orchestration. A run goes:
//
//	check        read both schemas; list every precondition problem (R6)
//	checkTarget  refuse a target holding rows that differ from the source's (R5)
//	startCapture triggers on the old database record changed keys (R7)
//	prepare      the target loses its indexes, keys and triggers for the load
//	initialCopy  every table, in parallel, from one snapshot taken after capture began
//	catchUp      incremental rounds until the backlog is small
//	final        inside the pause: last round, sequences, keys and triggers back
//	finish       after the switch: validate foreign keys
//
// and cleanup undoes everything a run installed, from any point, on any node.
// The mechanics live in internal/schema, internal/capture and
// internal/replicate; their package docs hold the correctness arguments.

// ErrPreconditions is wrapped by the error listing precondition problems; the
// error's text names every object at fault.
var ErrPreconditions = errors.New("swo: preconditions not met")

// ErrTargetNotEmpty is wrapped when the new database holds rows that differ
// from the old database's and Config.AllowClearTarget is not set.
var ErrTargetNotEmpty = errors.New("swo: the new database holds data that would be lost")

// syncRun is one data sync from the old to the next database.
type syncRun struct {
	c   *Connector
	eng *replicate.Engine
	cap capture.Capture
	// keep names target tables whose rows equalled the source's before the
	// run: an abort leaves them filled rather than empty.
	keep map[string]bool
}

// syncConfig returns the pgx settings of the library's sync sessions.
func (c *Connector) syncConfig(e *endpoint) *pgx.ConnConfig { return c.roleConfig(e, roleSync) }

func (c *Connector) roleConfig(e *endpoint, role string) *pgx.ConnConfig {
	cfg := e.cfg.Copy()
	cfg.RuntimeParams["application_name"] = c.appName(e, role)
	return cfg
}

// check reads both schemas and returns a run ready to start, or an error
// wrapping ErrPreconditions that lists every problem.
func (c *Connector) check(ctx context.Context) (*syncRun, error) {
	if c.next == nil {
		return nil, fmt.Errorf("%w: no --db-url-next configured", ErrConfig)
	}
	src, err := c.connect(ctx, c.old, roleSync)
	if err != nil {
		return nil, err
	}
	defer src.Close(context.Background())
	dst, err := c.connect(ctx, c.next, roleSync)
	if err != nil {
		return nil, err
	}
	defer dst.Close(context.Background())

	var problems schema.Problems
	if same, err := c.sameDatabase(ctx, src, dst); err != nil {
		return nil, err
	} else if same {
		problems = append(problems, schema.Problem{Object: "database", Issue: "--db-url and --db-url-next reach the same database"})
	}
	opts := schema.Options{LibrarySchema: c.cfg.Namespace}
	// The shape the final sync compares against is taken in the snapshot
	// the run is planned from: DDL at any later moment is caught.
	var shape schema.Shape
	var shapeSQL string
	srcOpts := opts
	srcOpts.Also = func(ctx context.Context, tx pgx.Tx, db *schema.Database) error {
		moved := db.Select(c.cfg.ExcludeTables).Tables
		oids := make([]uint32, len(moved))
		for i, t := range moved {
			oids[i] = t.OID
		}
		shapeSQL = schema.ShapeSQL(oids, c.cfg.Namespace)
		var err error
		shape, err = schema.ReadShape(ctx, tx, shapeSQL, c.cfg.ExcludeTables)
		return err
	}
	srcFull, err := schema.Read(ctx, src, srcOpts)
	if err != nil {
		return nil, c.scrub(fmt.Errorf("old database: %w", err))
	}
	dstFull, err := schema.Read(ctx, dst, opts)
	if err != nil {
		return nil, c.scrub(fmt.Errorf("new database: %w", err))
	}
	source, target := srcFull.Select(c.cfg.ExcludeTables), dstFull.Select(c.cfg.ExcludeTables)
	problems = append(problems, schema.Check(source, target, c.cfg.ExcludeTables)...)
	problems = append(problems, schema.CheckReferences(srcFull, c.cfg.ExcludeTables)...)
	problems = append(problems, schema.CheckReferences(dstFull, c.cfg.ExcludeTables)...)
	if len(source.Tables) == 0 {
		problems = append(problems, schema.Problem{Object: "database", Issue: "the old database has no tables to move (all excluded?)"})
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrPreconditions, problems)
	}
	return &syncRun{
		c:   c,
		cap: capture.Capture{Schema: c.cfg.Namespace},
		eng: &replicate.Engine{
			Src: c.syncConfig(c.old), Dst: c.syncConfig(c.next), SourceID: c.old.info.ID,
			Schema: c.cfg.Namespace, Source: source, Target: target,
			RefusedNow: srcFull.RefusedNowSQL(c.cfg.ExcludeTables),
			Shape:      shape, ShapeSQL: shapeSQL, Exclude: c.cfg.ExcludeTables,
			Workers: c.cfg.SyncWorkers, Log: c.log, Progress: &replicate.Progress{},
		},
	}, nil
}

// sameDatabase tells, by a live session check, whether the two connections
// reach one database (whatever their identities say).
func (c *Connector) sameDatabase(ctx context.Context, a, b *pgx.Conn) (bool, error) {
	sess, err := meta.CurrentSession(ctx, a)
	if err != nil {
		return false, err
	}
	return meta.SeesSession(ctx, b, sess)
}

// checkTarget refuses (R5) a target whose tables hold rows that differ from
// the source's, unless they were put there by an earlier run from this
// source or the configuration allows clearing. Tables with identical content
// are fine and remembered in keep.
func (r *syncRun) checkTarget(ctx context.Context) error {
	dst, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		return r.c.scrub(err)
	}
	defer dst.Close(context.Background())
	var targets []*schema.Table
	for _, t := range r.eng.Source.Tables {
		targets = append(targets, r.eng.Target.Table(t.String()))
	}
	filled, err := replicate.NonEmpty(ctx, dst, targets)
	if err != nil {
		return fmt.Errorf("check the new database's tables: %w", err)
	}
	r.keep = map[string]bool{}
	r.eng.Keep = r.keep
	if len(filled) == 0 {
		return nil
	}
	info, _, err := r.c.meta.Read(ctx, dst)
	if err != nil {
		return err
	}
	ours := info.FilledFrom == r.c.old.info.ID && info.FilledFrom != uuid.Nil
	only := *r.eng.Source
	only.Tables, only.Sequences = nil, nil
	for _, t := range r.eng.Source.Tables {
		if filled[t.String()] {
			only.Tables = append(only.Tables, t)
		}
	}
	rep, err := replicate.Verify(ctx, r.eng.Src, r.eng.Dst, &only, r.eng.Target, r.eng.Workers)
	if err != nil {
		return fmt.Errorf("compare the new database's rows with the old one's: %w", err)
	}
	var differ []string
	for _, tc := range rep.Tables {
		if tc.Equal {
			r.keep[tc.Table] = true
		} else {
			differ = append(differ, fmt.Sprintf("%s (%d rows; %d in the old database)", tc.Table, tc.NewRows, tc.OldRows))
		}
	}
	sort.Strings(differ)
	if len(differ) > 0 && !ours && !r.c.cfg.AllowClearTarget {
		return fmt.Errorf("%w: tables in %s hold rows that differ from the old database's and were not written by swo: %v; "+
			"empty them, or set Config.AllowClearTarget to let the switchover clear them", ErrTargetNotEmpty, dsn.Describe(r.c.next.cfg), differ)
	}
	return nil
}

// startCapture installs change capture on the old database.
func (r *syncRun) startCapture(ctx context.Context) error {
	conn, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		return r.c.scrub(err)
	}
	defer conn.Close(context.Background())
	return r.cap.Install(ctx, conn, r.eng.Source.Tables, capture.Options{Timeout: r.c.cfg.CaptureTimeout})
}

// prepare readies the target for the bulk load and marks it as being filled
// from the old database, in one transaction.
func (r *syncRun) prepare(ctx context.Context) error {
	conn, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		return r.c.scrub(err)
	}
	defer conn.Close(context.Background())
	mark := fmt.Sprintf("UPDATE %s SET filled_from = '%s'", r.c.meta.Table("meta"), r.c.old.info.ID)
	return r.eng.Prepare(ctx, conn, mark)
}

// initialCopy copies the data, rebuilds the target's indexes and computes
// its materialized views.
func (r *syncRun) initialCopy(ctx context.Context) error {
	if err := r.eng.InitialCopy(ctx); err != nil {
		return err
	}
	if err := r.eng.RebuildIndexes(ctx); err != nil {
		return err
	}
	return r.eng.RefreshMatViews(ctx)
}

// sealPartitioned makes the old database's partitioned tables refuse
// writes (capture.Capture.SealPartitioned).
func (r *syncRun) sealPartitioned(ctx context.Context) error {
	if len(r.eng.Source.Partitioned) == 0 {
		return nil
	}
	conn, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		return r.c.scrub(err)
	}
	defer conn.Close(context.Background())
	return r.cap.SealPartitioned(ctx, conn, r.eng.Source.Partitioned, capture.Options{Timeout: r.c.cfg.CaptureTimeout})
}

// refusedNow fails if a refused kind of object appeared in the old
// database since the preconditions were checked.
func (r *syncRun) refusedNow(ctx context.Context) error {
	if r.eng.RefusedNow == "" {
		return nil
	}
	conn, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		return r.c.scrub(err)
	}
	defer conn.Close(context.Background())
	var refused []string
	if err := conn.QueryRow(ctx, r.eng.RefusedNow).Scan(&refused); err != nil {
		return err
	}
	if len(refused) > 0 {
		return fmt.Errorf("%w: %s", replicate.ErrRefusedAppeared, strings.Join(refused, ", "))
	}
	return nil
}

// changeTableBlockers names the sessions and prepared transactions holding
// locks on the change table of the old database.
func (c *Connector) changeTableBlockers() string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return "(could not list them: " + err.Error() + ")"
	}
	defer closeBounded(conn)
	var oid uint32
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1)::oid", c.cfg.Namespace+".changes").Scan(&oid); err != nil {
		return "(could not list them: " + err.Error() + ")"
	}
	return capture.Blockers(ctx, conn, oid)
}

// catchUp runs incremental rounds until the backlog is small.
func (r *syncRun) catchUp(ctx context.Context) error {
	src, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		return r.c.scrub(err)
	}
	defer src.Close(context.Background())
	dst, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		return r.c.scrub(err)
	}
	defer dst.Close(context.Background())
	return r.eng.CatchUp(ctx, src, dst, 100*time.Millisecond)
}

// final runs the last round inside the pause, in oldTx, and consumes the
// applied changes there (the caller commits oldTx); see replicate.Engine.Final.
func (r *syncRun) final(ctx context.Context, oldTx pgx.Tx, dst *pgx.Conn) (replicate.FinalResult, error) {
	res, err := r.eng.Final(ctx, oldTx, dst)
	if err == nil && res.Consume != "" {
		_, err = oldTx.Exec(ctx, res.Consume)
	}
	return res, err
}

// cleanup removes everything a run installed: capture on the old database,
// and on the new one the loaded rows (but those kept) and the dropped keys,
// indexes, foreign keys and disabled triggers, which come back. Idempotent;
// it needs no state from the run, so RESET can call it on any node. It
// refuses once the old database says the switch committed: the new database
// is live then, and capture on the old one enforces its obsolescence.
func (c *Connector) cleanup(ctx context.Context) error {
	src, err := replicate.Connect(ctx, c.syncConfig(c.old))
	if err != nil {
		return c.scrub(err)
	}
	defer src.Close(context.Background())
	info, _, err := c.meta.Read(ctx, src)
	if err != nil {
		return c.scrub(fmt.Errorf("old database: %w", err))
	}
	if info.Obsolete() {
		return fmt.Errorf("%w: the switch has committed; nothing is cleaned up", ErrObsolete)
	}
	var errs []error
	if err := (capture.Capture{Schema: c.cfg.Namespace}).Remove(ctx, src, capture.Options{Timeout: c.cfg.CaptureTimeout}); err != nil {
		errs = append(errs, fmt.Errorf("old database: %w", err))
	}
	// Once the loaded rows are gone, the new database no longer holds data of
	// a run: clearing it again needs the R5 check.
	unmark := fmt.Sprintf("UPDATE %s SET filled_from = NULL", c.meta.Table("meta"))
	if err := replicate.Undo(ctx, c.syncConfig(c.next), c.cfg.Namespace, c.old.info.ID, unmark); err != nil {
		errs = append(errs, fmt.Errorf("new database: %w", err))
	}
	return c.scrub(errors.Join(errs...))
}

// VerifyReport is the result of Verify.
type VerifyReport = replicate.Report

// Verify compares every synced table between the old and the new database
// (R10): row counts and content digests, computed in the databases. Run it
// after a switch, before the service writes much to the new database: it
// compares current contents.
func (c *Connector) Verify(ctx context.Context) (VerifyReport, error) {
	if c.next == nil {
		return VerifyReport{}, fmt.Errorf("%w: Verify needs --db-url-next", ErrConfig)
	}
	src, err := c.connect(ctx, c.old, roleVerify)
	if err != nil {
		return VerifyReport{}, err
	}
	defer src.Close(context.Background())
	dst, err := c.connect(ctx, c.next, roleVerify)
	if err != nil {
		return VerifyReport{}, err
	}
	defer dst.Close(context.Background())
	opts := schema.Options{LibrarySchema: c.cfg.Namespace}
	source, err := schema.Read(ctx, src, opts)
	if err != nil {
		return VerifyReport{}, c.scrub(err)
	}
	target, err := schema.Read(ctx, dst, opts)
	if err != nil {
		return VerifyReport{}, c.scrub(err)
	}
	rep, err := replicate.Verify(ctx, c.roleConfig(c.old, roleVerify), c.roleConfig(c.next, roleVerify),
		source.Select(c.cfg.ExcludeTables), target.Select(c.cfg.ExcludeTables), c.cfg.SyncWorkers)
	return rep, c.scrub(err)
}

// ---- The leader's run: sync, pause, final sync, commit ----

// prepareFor is how long the leader gives nodes, between announcing the
// pause and starting it, to open their connections to the new database.
const prepareFor = 300 * time.Millisecond

// leaderRun is the execution this node leads.
type leaderRun struct {
	run      int64
	cancel   context.CancelFunc
	done     chan struct{}
	progress *replicate.Progress
}

// Progress is the progress of a run's current phase (R11).
type Progress = replicate.Snapshot

// startLeading starts leading the run, unless already doing so.
func (c *Connector) startLeading(run int64) {
	c.leadMu.Lock()
	defer c.leadMu.Unlock()
	if c.closed.Load() || (c.leading != nil && c.leading.run == run) {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	lr := &leaderRun{run: run, cancel: cancel, done: make(chan struct{}), progress: &replicate.Progress{}}
	c.leading = lr
	go func() {
		defer func() {
			c.leadMu.Lock()
			if c.leading == lr {
				c.leading = nil
			}
			c.leadMu.Unlock()
			close(lr.done)
		}()
		c.lead(ctx, lr)
	}()
}

// stopLeading cancels the run this node leads (a RESET came, the run was
// failed, or Close): its sessions end, which releases its locks; the
// resetter cleans up. wait waits for the run's goroutine to end (Close only:
// the run may itself be waiting to observe a message).
func (c *Connector) stopLeading(wait bool) {
	c.leadMu.Lock()
	lr := c.leading
	c.leading = nil
	c.leadMu.Unlock()
	if lr != nil {
		lr.cancel()
		if wait {
			<-lr.done
		}
	}
}

func (c *Connector) leaderProgress() *Progress {
	c.leadMu.Lock()
	defer c.leadMu.Unlock()
	if c.leading == nil {
		return nil
	}
	p := c.leading.progress.Snapshot()
	return &p
}

// lead runs the execution. It holds the exec lock throughout, on its own
// session, so that no RESET cleans up under its feet and no other leader can
// run. If the run fails (rather than being cancelled by a RESET), it reports
// the failure, which resumes every node on the old database, and cleans up,
// still under the exec lock.
func (c *Connector) lead(ctx context.Context, lr *leaderRun) {
	sess, err := c.connect(ctx, c.old, roleLock)
	if err != nil {
		c.leadFailed(lr, nil, err)
		return
	}
	defer closeBounded(sess)
	if err := c.keys.lockExclusive(ctx, sess, lockExec, 30*time.Second); err != nil {
		c.leadFailed(lr, nil, fmt.Errorf("take the execution lock (held by %s): %w", c.keys.holders(ctx, sess, lockExec), err))
		return
	}
	if err := c.execute(ctx, lr, sess); err != nil && ctx.Err() == nil {
		c.leadFailed(lr, sess, err)
	}
}

// leadFailed reports a failed run and, if sess still holds the exec lock,
// cleans up under it.
func (c *Connector) leadFailed(lr *leaderRun, sess *pgx.Conn, err error) {
	err = c.scrub(err)
	c.noteErr(fmt.Errorf("swo: execution failed: %w", err))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := sess
	if conn == nil || conn.Ping(ctx) != nil {
		sess = nil // the exec lock went with the session: RESET cleans up
		var cerr error
		if conn, cerr = c.connect(ctx, c.old, roleCtl); cerr != nil {
			return // the old database is unreachable: the owner check fails the run later
		}
		defer closeBounded(conn)
	}
	_, aerr := c.msgs.Append(ctx, conn, c.id, msglog.KindFailed, lr.run, failedData{Error: err.Error()}, runOpen(lr.run))
	c.poke()
	if aerr != nil || sess == nil {
		return
	}
	// The pause window's server-side timeouts must not end the session (and
	// the exec lock with it) in the middle of the cleanup.
	if _, err := sess.Exec(ctx, `SELECT set_config('idle_in_transaction_session_timeout', '0', false),
	CASE WHEN current_setting('server_version_num')::int >= 140000 THEN set_config('idle_session_timeout', '0', false) END`); err != nil {
		return
	}
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer ccancel()
	if cerr := c.cleanup(cctx); cerr != nil {
		c.noteErr(fmt.Errorf("swo: cleanup after the failed execution (RESET will retry): %w", cerr))
	}
}

// runOpen refuses an append once the run is over (switched, failed, reset).
func runOpen(run int64) func(*msglog.Message) error {
	return func(last *msglog.Message) error {
		if last == nil || last.Run != run {
			return errors.New("a new run started")
		}
		switch last.Kind {
		case msglog.KindDone, msglog.KindConfirm, msglog.KindFailed:
			return errors.New("the run is over")
		}
		return nil
	}
}

// closeBounded closes a connection without waiting long on a dead network.
func closeBounded(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn.Close(ctx)
}

// afterSwitchTimeout bounds the leader's work after the switch (sealing the
// old database, validating foreign keys).
const afterSwitchTimeout = 5 * time.Minute

// execute is the leader's run, on sess, which holds the exec lock.
func (c *Connector) execute(ctx context.Context, lr *leaderRun, sess *pgx.Conn) error {
	leadCtx := ctx // ended by RESET and Close; ctx gets the window's deadline below
	stillRunning := func(kind string) func(*msglog.Message) error {
		return func(last *msglog.Message) error {
			if last == nil || last.Run != lr.run || last.Kind != kind {
				return errors.New("the run was reset or failed meanwhile")
			}
			return nil
		}
	}

	// Sync while the service runs. The guard stops every sync step of this
	// run as soon as sess no longer holds the exec lock (a RESET took over).
	r, err := c.check(ctx)
	if err != nil {
		return err
	}
	r.eng.Progress = lr.progress
	r.eng.FinalTimeout = c.cfg.FinalTimeout
	r.eng.LockBudget = c.cfg.PauseBudget
	r.eng.Guard = fmt.Sprintf(`SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid::int4 = %d
	AND objid::int4 = %d AND objsubid = 2 AND granted AND pid = %d)`, c.keys.space, lockExec, sess.PgConn().PID())
	for _, step := range []struct {
		name string
		fn   func(context.Context) error
	}{
		{"check the new database's content", r.checkTarget},
		{"start change capture", r.startCapture},
		{"prepare the new database", r.prepare},
		{"initial copy", r.initialCopy},
		{"incremental sync", r.catchUp},
	} {
		if err := step.fn(ctx); err != nil {
			return fmt.Errorf("%s: %w", step.name, err)
		}
		c.at(ctx, step.name)
	}
	dst, err := replicate.Connect(ctx, r.eng.Dst) // opened now: the pause should not wait for it
	if err != nil {
		return c.scrub(err)
	}
	defer closeBounded(dst)
	// A refused kind of object that appeared during the run (a prepared
	// transaction holding the change table, say) would make the final sync
	// refuse anyway: say so before the service pauses for nothing.
	if err := r.refusedNow(ctx); err != nil {
		return err
	}

	// Announce the pause, so that nodes open their connections to the new
	// database now, and catch up once more meanwhile.
	m, err := c.msgs.Append(ctx, sess, c.id, msglog.KindPrepare, lr.run, nil, stillRunning(msglog.KindExecute))
	if err != nil {
		return err
	}
	c.observe(m)
	warmUntil := time.Now().Add(prepareFor)
	if err := r.catchUp(ctx); err != nil {
		return fmt.Errorf("incremental sync: %w", err)
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Until(warmUntil)):
	}
	if err := r.catchUp(ctx); err != nil {
		return fmt.Errorf("incremental sync: %w", err)
	}

	// The pause: every node drains; the connection lock comes when the last
	// application connection to the old database has gone. The window has a
	// deadline on both sides: here, and on the server, which ends this
	// session (and so the window) if this process stalls inside it.
	budget, finalBudget := c.cfg.PauseBudget, c.cfg.FinalTimeout
	window := budget + finalBudget + 5*time.Second
	ctx, cancel := context.WithTimeout(ctx, window)
	defer cancel()
	if _, err := sess.Exec(ctx, `SELECT set_config('idle_in_transaction_session_timeout', $1, false),
	CASE WHEN current_setting('server_version_num')::int >= 140000 THEN set_config('idle_session_timeout', $1, false) END`,
		fmt.Sprintf("%dms", window.Milliseconds())); err != nil {
		return err
	}
	lr.progress.SetPhase("pausing", 0, 0)
	pauseStart := time.Now()
	m, err = c.msgs.Append(ctx, sess, c.id, msglog.KindPause, lr.run,
		pauseData{BudgetMS: budget.Milliseconds(), FinalMS: finalBudget.Milliseconds()}, stillRunning(msglog.KindPrepare))
	if err != nil {
		return err
	}
	// The leader's own messages follow messages it has seen (the append
	// checks that), so it may apply them at once rather than wait for the
	// notification.
	c.observe(m)
	c.log.Debug("swo: pause announced", "after", time.Since(pauseStart))
	c.at(ctx, "pausing")
	if err := c.keys.lockExclusive(ctx, sess, lockConn, budget); err != nil {
		if errors.Is(err, errLockTimeout) {
			return fmt.Errorf("%w (%v): application connections to the old database still open: %s", ErrPauseBudget, budget,
				c.keys.holders(ctx, sess, lockConn))
		}
		return err
	}
	defer func() {
		uctx, ucancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer ucancel()
		_ = c.keys.unlock(uctx, sess, lockConn)
	}()
	if err := c.strayApplicationSessions(ctx, sess); err != nil {
		return err
	}
	if m, err = c.msgs.Append(ctx, sess, c.id, msglog.KindExecuting, lr.run, nil, stillRunning(msglog.KindPause)); err != nil {
		return err
	}
	c.observe(m)
	c.log.Debug("swo: connection lock taken", "after", time.Since(pauseStart))
	c.at(ctx, "locked")

	// Final sync and commit, in one transaction on the old database.
	lr.progress.SetPhase("final sync", 0, 0)
	finalStart := time.Now()
	// READ COMMITTED is pinned: the final sync's reads are sent (and, under
	// REPEATABLE READ, would take their snapshot) before its LOCK has waited
	// for the last writers, whose changes they must see. synchronous_commit
	// is pinned on: the switch must survive a crash of the old database.
	// Neither may depend on the role's or the database's defaults.
	tx, err := sess.BeginTx(ctx, pgx.TxOptions{BeginQuery: fmt.Sprintf(
		"BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = %[1]d; SET LOCAL lock_timeout = %[1]d; SET LOCAL synchronous_commit = on",
		finalBudget.Milliseconds())})
	if err != nil {
		return err
	}
	defer func() {
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer rcancel()
		_ = tx.Rollback(rctx)
	}()
	res, err := r.eng.Final(ctx, tx, dst)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
		return fmt.Errorf("%w (%v): the final sync could not lock the change table: %s", ErrPauseBudget, budget, c.changeTableBlockers())
	}
	if err != nil {
		return err
	}
	c.log.Debug("swo: final sync committed on the new database", "after", time.Since(pauseStart), "changes", res.Changes, "final", res.Duration)
	c.at(ctx, "final")
	// The commit: consume the changes, mark the old database obsolete and
	// make it refuse writes, log "done", in two round trips.
	msg := fmt.Sprintf("swo: database %s is obsolete: it was switched over to database %s; writes are refused. Use the new database.",
		c.old.info.ID, c.nextInfo().ID)
	mark := append([]string{c.meta.MarkSwitchedSQL(c.nextInfo().ID)}, r.cap.RejectWritesSQL(msg)...)
	if res.Consume != "" {
		mark = append(mark, res.Consume)
	}
	done := doneData{To: c.nextInfo().ID, PauseMS: time.Since(pauseStart).Milliseconds(), FinalMS: time.Since(finalStart).Milliseconds(), Changes: res.Changes}
	if m, err = c.msgs.AppendTx(ctx, tx, c.id, msglog.KindDone, lr.run, done, stillRunning(msglog.KindExecuting), mark...); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return c.commitOutcome(err)
	}
	_ = c.keys.unlock(ctx, sess, lockConn)
	c.observe(m)
	c.log.Info("swo: switched", "pause", time.Since(pauseStart), "final_sync", time.Duration(done.FinalMS)*time.Millisecond,
		"final_changes", res.Changes)

	// After the switch, without blocking the service (outside the window's
	// deadline, but bounded, and ended by Close): seal the old database
	// (its sequences, and partitions created later), and validate the new
	// database's foreign keys.
	cancel()
	after, afterCancel := context.WithTimeout(leadCtx, afterSwitchTimeout)
	defer afterCancel()
	lr.progress.SetPhase("sealing the old database", 0, 0)
	if err := r.eng.FreezeSequences(after, res); err != nil {
		c.noteErr(fmt.Errorf("swo: switched, but freezing sequences in the old database failed (nextval still works there): %w", err))
	}
	if err := r.sealPartitioned(after); err != nil {
		c.noteErr(fmt.Errorf("swo: switched, but sealing partitioned tables in the old database failed (a partition created there later would take writes): %w", err))
	}
	lr.progress.SetPhase("validating foreign keys", 0, 0)
	if err := r.eng.Finish(after); err != nil {
		c.noteErr(fmt.Errorf("swo: switched, but validating foreign keys in the new database failed: %w", err))
	}
	lr.progress.SetPhase("done", 0, 0)
	return nil
}

// at calls the test hook at a phase boundary of the leader's run.
func (c *Connector) at(ctx context.Context, phase string) {
	if c.testHook != nil {
		c.testHook(ctx, phase)
	}
}

// commitOutcome decides, after the switch's COMMIT returned an error (the
// connection may have died with the COMMIT in flight), whether the switch
// committed: the old database's mark is the truth.
func (c *Connector) commitOutcome(commitErr error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return fmt.Errorf("commit of the switch: %w (outcome unknown: the old database is unreachable; RESET will tell)", commitErr)
	}
	defer conn.Close(context.Background())
	if info, _, err := c.meta.Read(ctx, conn); err == nil && info.Obsolete() {
		c.log.Warn("swo: the switch committed although COMMIT reported an error", "error", commitErr)
		return nil
	}
	return fmt.Errorf("commit of the switch: %w", commitErr)
}

// strayApplicationSessions refuses the switch if application sessions are on
// the old database without holding the connection lock (it was released
// behind the library's back: pg_advisory_unlock_all, DISCARD ALL): they could
// write after the switch. Sessions that wait for the lock are fine: they read
// the switch state once they get it.
//
// A backend that is exiting (a connection the drain has just closed, whose
// release of the lock is what let this session take it) releases its locks
// before it leaves pg_stat_activity: for a moment it looks like a stray. It
// can no longer write, and it is gone within milliseconds; so only sessions
// still there after strayGrace are strays.
func (c *Connector) strayApplicationSessions(ctx context.Context, conn *pgx.Conn) error {
	deadline := time.Now().Add(strayGrace)
	for {
		stray, err := c.listStraySessions(ctx, conn)
		if err != nil || len(stray) == 0 {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("swo: application sessions on the old database lost the connection lock (pg_advisory_unlock_all or DISCARD ALL on a connector's connection?): %v; the switch is refused because they could write after it", stray)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// strayGrace is how long a session without the connection lock may take to
// disappear before it counts as a stray.
const strayGrace = 300 * time.Millisecond

func (c *Connector) listStraySessions(ctx context.Context, conn *pgx.Conn) ([]string, error) {
	rows, err := conn.Query(ctx, `SELECT a.pid || ' ' || a.application_name FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.application_name LIKE '%' || $3 || ':app%'
	AND a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')
	AND a.backend_start < statement_timestamp() - interval '1 second'
	AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'
		AND l.classid::int4 = $1 AND l.objid::int4 = $2 AND l.objsubid = 2)`, c.keys.space, lockConn, c.cfg.Namespace)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}
