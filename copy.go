package swo

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgswo/swo/internal/capture"
	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/meta"
	"github.com/pgswo/swo/internal/msglog"
	"github.com/pgswo/swo/internal/replicate"
	"github.com/pgswo/swo/internal/schema"
)

// The leader's run, and the data sync it drives.
//
// Words, each for one span of time:
//
//	run          from EXECUTE to "done" or "failed": what one node leads
//	sync         the run while the service works normally: check, capture,
//	             initial copy, incremental rounds (state syncing)
//	window       the stop-the-world part: from the pause announcement to the
//	             commit (states pausing, then executing once the leader holds
//	             the connection lock)
//	final sync   the last round, inside the window
//	commit       the one transaction on the old database that consumes the
//	             last changes, marks the database obsolete and logs "done"
//	after switch sealing the old database, validating the new one's keys
//
// The data sync's steps, in order:
//
//	check        read both schemas; list every precondition problem
//	checkTarget  refuse a target holding rows that differ from the source's
//	startCapture triggers on the old database record changed keys
//	prepare      the target loses its indexes, keys and triggers for the load
//	initialCopy  every table, in parallel, from one snapshot taken after capture began
//	catchUp      incremental rounds until the backlog is small
//	final        inside the window: last round, sequences, keys and triggers back
//	finish       after the switch: validate foreign keys
//
// and cleanup undoes everything a run installed, from any point, on any node.
// The mechanics live in internal/schema, internal/capture and
// internal/replicate; their package docs hold the correctness arguments.

// syncRun is one data sync from the old to the next database.
type syncRun struct {
	c   *common
	eng *replicate.Engine
	cap capture.Capture
	// keep names target tables whose rows equalled the source's before the
	// run: an abort leaves them filled rather than empty.
	keep map[string]bool
	// incSrc and incDst are the incremental sync's sessions, opened by its
	// first round and kept for the rest of the run (closeSessions): over a
	// slow link a connection costs several round trips, and the backlog
	// grows meanwhile.
	incSrc, incDst *pgx.Conn
}

// check reads both schemas and returns a run ready to start, or a
// *PreconditionError that lists every problem.
func (c *common) check(ctx context.Context) (*syncRun, error) {
	if c.next == nil {
		return nil, fmt.Errorf("%w: no NextURL (--db-url-next) configured", ErrConfig)
	}
	srcCfg, err := c.config(ctx, c.old, roleSync)
	if err != nil {
		return nil, err
	}
	dstCfg, err := c.config(ctx, c.next, roleSync)
	if err != nil {
		return nil, err
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
	if same, err := sameDatabase(ctx, src, dst); err != nil {
		return nil, err
	} else if same {
		problems = append(problems, schema.Problem{Object: "database", Issue: "--db-url and --db-url-next (Config.OldURL and Config.NextURL) reach the same database"})
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
		return nil, fmt.Errorf("old database: %w", err)
	}
	dstFull, err := schema.Read(ctx, dst, opts)
	if err != nil {
		return nil, fmt.Errorf("new database: %w", err)
	}
	source, target := srcFull.Select(c.cfg.ExcludeTables), dstFull.Select(c.cfg.ExcludeTables)
	problems = append(problems, schema.Check(source, target, c.cfg.ExcludeTables)...)
	problems = append(problems, schema.CheckReferences(srcFull, c.cfg.ExcludeTables)...)
	problems = append(problems, schema.CheckReferences(dstFull, c.cfg.ExcludeTables)...)
	if len(source.Tables) == 0 {
		problems = append(problems, schema.Problem{Object: "database", Issue: "the old database has no tables to move (all excluded by Config.ExcludeTables?)"})
	}
	if len(problems) > 0 {
		probs := make([]Problem, len(problems))
		for i, p := range problems {
			probs[i] = Problem{Object: p.Object, Issue: p.Issue}
		}
		return nil, preconditions(probs)
	}
	return &syncRun{
		c:   c,
		cap: capture.Capture{Schema: c.cfg.Namespace},
		eng: &replicate.Engine{
			Src: srcCfg, Dst: dstCfg, SourceID: c.old.Info().ID,
			Schema: c.cfg.Namespace, Source: source, Target: target,
			RefusedNow: srcFull.RefusedNowSQL(c.cfg.ExcludeTables),
			Shape:      shape, ShapeSQL: shapeSQL, Exclude: c.cfg.ExcludeTables,
			Workers: c.cfg.SyncWorkers, Log: c.log, Progress: &replicate.Progress{},
		},
	}, nil
}

// checkTarget refuses (R5) a target whose tables hold rows that differ from
// the source's, unless they were put there by an earlier run from this
// source or the configuration allows clearing. Tables with identical content
// are fine and remembered in keep.
func (r *syncRun) checkTarget(ctx context.Context) error {
	dst, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		return err
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
	ours := info.FilledFrom == r.c.old.Info().ID && info.FilledFrom != uuid.Nil
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
	// Tables an aborted run from this source loaded again and left filled
	// hold rows swo wrote: they may be cleared like the rest of a run's.
	keptBefore, err := replicate.KeptFrom(ctx, dst, r.c.cfg.Namespace, r.c.old.Info().ID)
	if err != nil {
		return err
	}
	var differ []string
	for _, tc := range rep.Tables {
		switch {
		case tc.Equal:
			r.keep[tc.Table] = true
		case !keptBefore[tc.Table]:
			differ = append(differ, fmt.Sprintf("%s (%d rows; %d in the old database)", tc.Table, tc.NewRows, tc.OldRows))
		}
	}
	sort.Strings(differ)
	if len(differ) > 0 && !ours && !r.c.cfg.AllowClearTarget {
		return fmt.Errorf("%w: tables in %s hold rows that differ from the old database's and were not written by swo: %v; "+
			"empty them, or set Config.AllowClearTarget to let the switchover clear them", ErrTargetNotEmpty, r.c.next.describe(), differ)
	}
	return nil
}

// startCapture installs change capture on the old database.
func (r *syncRun) startCapture(ctx context.Context) error {
	conn, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	err = r.cap.Install(ctx, conn, r.eng.Source.Tables, r.eng.Source.Partitioned, capture.Options{Timeout: r.c.cfg.CaptureTimeout, MaxLockTimeout: r.c.cfg.PauseBudget})
	if errors.Is(err, capture.ErrBlocked) {
		return fmt.Errorf("%w (waited Config.CaptureTimeout, %v: end those transactions, or raise it)", err, r.c.cfg.CaptureTimeout)
	}
	return err
}

// prepare readies the target for the bulk load and marks it as being filled
// from the old database, in one transaction.
func (r *syncRun) prepare(ctx context.Context) error {
	conn, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	from := r.c.old.Info().ID
	return r.eng.Prepare(ctx, conn, func(ctx context.Context, tx pgx.Tx) error { return r.c.meta.SetFilledFrom(ctx, tx, from) })
}

// initialCopy copies the data, rebuilds the target's indexes and computes
// its materialized views.
func (r *syncRun) initialCopy(ctx context.Context) error {
	if err := r.eng.InitialCopy(ctx); err != nil {
		return err
	}
	return r.eng.RefreshMatViews(ctx)
}

// refusedNow fails if a refused kind of object appeared in the old
// database since the preconditions were checked.
func (r *syncRun) refusedNow(ctx context.Context) error {
	if r.eng.RefusedNow == "" {
		return nil
	}
	if err := r.openSessions(ctx); err != nil {
		return err
	}
	var refused []string
	if err := r.incSrc.QueryRow(ctx, r.eng.RefusedNow).Scan(&refused); err != nil {
		return err
	}
	if len(refused) > 0 {
		return fmt.Errorf("%w: %s", replicate.ErrRefusedAppeared, strings.Join(refused, ", "))
	}
	return nil
}

// dryRunOn makes Check's checks of one database's swo schema: obsolete,
// not the library's, privileges to create it, and, on the old database,
// the nodes (their settings against this check's too) and whether a run is
// in progress (its state, or StateUnknown).
func (s *common) dryRunOn(ctx context.Context, conn *pgx.Conn, e *endpoint) (probs []Problem, running State, err error) {
	info, ok, err := s.meta.Read(ctx, conn)
	if errors.Is(err, meta.ErrForeignSchema) {
		return []Problem{{Object: e.label + " database", Issue: err.Error()}}, StateUnknown, nil
	}
	if err != nil {
		return nil, StateUnknown, err
	}
	if !ok {
		// RESET will create the schema: CREATE on the database, or on a
		// schema an administrator created for the role.
		var may bool
		var role string
		if err := conn.QueryRow(ctx, `SELECT current_user, CASE WHEN to_regnamespace($1) IS NULL THEN has_database_privilege(current_database(), 'CREATE')
	ELSE has_schema_privilege($1, 'CREATE') AND has_schema_privilege($1, 'USAGE') END`, s.cfg.Namespace).Scan(&role, &may); err != nil {
			return nil, StateUnknown, err
		}
		if !may {
			probs = append(probs, Problem{Object: e.label + " database", Issue: fmt.Sprintf(
				"role %q may not create swo's schema %q: have an administrator run GRANT CREATE ON DATABASE %s TO %s, or CREATE SCHEMA %s AUTHORIZATION %s",
				role, s.cfg.Namespace, pgx.Identifier{conn.Config().Database}.Sanitize(), pgx.Identifier{role}.Sanitize(), s.cfg.Namespace, pgx.Identifier{role}.Sanitize())})
		}
		return probs, StateUnknown, nil
	}
	e.setInfo(info)
	if info.Obsolete() {
		probs = append(probs, Problem{Object: e.label + " database", Issue: s.obsolete(e, info).Error()})
	}
	if e != s.old {
		return probs, StateUnknown, nil
	}
	// A database that was the new one of an earlier switchover has the
	// schema without the cluster's tables until an instance starts on it
	// with a next database.
	var hasCluster bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
		s.meta.Table("nodes"), s.meta.Table("log")).Scan(&hasCluster); err != nil || !hasCluster {
		return probs, StateUnknown, err
	}
	nodes, err := (cluster.Table{Name: s.meta.Table("nodes")}).List(ctx, conn, defaultTimings.timeout)
	if err != nil {
		return nil, StateUnknown, err
	}
	if perr := nodeProblems(nodes); perr != nil {
		probs = append(probs, Problem{Object: "nodes", Issue: perr.Error()})
	}
	for _, n := range nodes {
		if n.Alive && n.Agreed != "" && n.Agreed != s.cfg.agreed() {
			probs = append(probs, Problem{Object: "configuration", Issue: fmt.Sprintf(
				"this check's settings (%s) differ from node %s's (%s): check with the service's Config.ExcludeTables and Config.AllowClearTarget (swoctl: --exclude-tables, --allow-clear-target), or the result says nothing about what its RESET will do",
				s.cfg.agreed(), n.Name, n.Agreed)})
			break
		}
	}
	msgs, err := msglog.Log{Table: s.meta.Table("log")}.Read(ctx, conn, 0)
	if err != nil {
		return nil, StateUnknown, err
	}
	switch v := derive(msgs, time.Now()); v.State {
	case StateSyncing, StatePausing, StateExecuting:
		running = v.State
	}
	return probs, running, nil
}

// lockBlockers names the sessions and prepared transactions holding locks
// on the change table of the old database and on the other tables named
// (oid → name), table by table.
func (c *common) lockBlockers(others map[uint32]string) string {
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
	out := capture.Blockers(ctx, conn, oid)
	var more []string
	for o, name := range others {
		if b := capture.Blockers(ctx, conn, o); !strings.Contains(b, "(they have ended since)") {
			more = append(more, name+": "+b)
		}
	}
	slices.Sort(more)
	if len(more) == 0 {
		return out
	}
	return "change table: " + out + "; " + strings.Join(more, "; ")
}

// catchUp runs incremental rounds until the backlog is small.
func (r *syncRun) catchUp(ctx context.Context) error {
	if err := r.openSessions(ctx); err != nil {
		return err
	}
	return r.eng.CatchUp(ctx, r.incSrc, r.incDst, 100*time.Millisecond)
}

// openSessions opens the incremental sync's sessions, or reopens them if
// one broke: a failed round may have left it unusable, and the server may
// have ended it while it was idle (a restart, an idle-connection reaper, a
// proxy's reset), which only a round trip shows.
func (r *syncRun) openSessions(ctx context.Context) error {
	for _, s := range []struct {
		conn **pgx.Conn
		cfg  *pgx.ConnConfig
	}{{&r.incSrc, r.eng.Src}, {&r.incDst, r.eng.Dst}} {
		if c := *s.conn; c != nil && !c.IsClosed() && c.PgConn().TxStatus() == 'I' && c.Ping(ctx) == nil {
			continue
		}
		if *s.conn != nil {
			closeBounded(*s.conn)
		}
		conn, err := replicate.Connect(ctx, s.cfg)
		if err != nil {
			*s.conn = nil
			return err
		}
		*s.conn = conn
	}
	return nil
}

// closeSessions closes the incremental sync's sessions.
func (r *syncRun) closeSessions() {
	for _, c := range []*pgx.Conn{r.incSrc, r.incDst} {
		if c != nil {
			closeBounded(c)
		}
	}
	r.incSrc, r.incDst = nil, nil
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
func (c *common) cleanup(ctx context.Context) error {
	srcCfg, err := c.config(ctx, c.old, roleSync)
	if err != nil {
		return err
	}
	dstCfg, err := c.config(ctx, c.next, roleSync)
	if err != nil {
		return err
	}
	src, err := replicate.Connect(ctx, srcCfg)
	if err != nil {
		return err
	}
	defer src.Close(context.Background())
	info, _, err := c.meta.Read(ctx, src)
	if err != nil {
		return fmt.Errorf("old database: %w", err)
	}
	if info.Obsolete() {
		return fmt.Errorf("%w: the switch has committed; nothing is cleaned up", ErrObsolete)
	}
	var errs []error
	if err := (capture.Capture{Schema: c.cfg.Namespace}).Remove(ctx, src, capture.Options{Timeout: c.cfg.CaptureTimeout, MaxLockTimeout: c.cfg.PauseBudget}); err != nil {
		errs = append(errs, fmt.Errorf("old database: %w", err))
	}
	// Once the loaded rows are gone, the new database no longer holds data of
	// a run: clearing it again needs the R5 check.
	unmark := func(ctx context.Context, tx pgx.Tx) error { return c.meta.SetFilledFrom(ctx, tx, uuid.Nil) }
	if err := replicate.Undo(ctx, dstCfg, c.cfg.Namespace, c.old.Info().ID, unmark); err != nil {
		errs = append(errs, fmt.Errorf("new database: %w", err))
	}
	return errors.Join(errs...)
}

// Verify compares every moved table and sequence between the old and the
// new database: row counts and content digests, computed in the databases.
// Run it after a switch, before the service writes much to the new
// database: it compares current contents.
func (c *Connector) Verify(ctx context.Context) (VerifyReport, error) {
	rep, err := c.verify(ctx)
	return rep, c.public(err)
}

func (c *common) verify(ctx context.Context) (VerifyReport, error) {
	if c.next == nil {
		return VerifyReport{}, fmt.Errorf("%w: Verify needs NextURL (--db-url-next)", ErrConfig)
	}
	srcCfg, err := c.config(ctx, c.old, roleVerify)
	if err != nil {
		return VerifyReport{}, err
	}
	dstCfg, err := c.config(ctx, c.next, roleVerify)
	if err != nil {
		return VerifyReport{}, err
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
		return VerifyReport{}, err
	}
	target, err := schema.Read(ctx, dst, opts)
	if err != nil {
		return VerifyReport{}, err
	}
	rep, err := replicate.Verify(ctx, srcCfg, dstCfg, source.Select(c.cfg.ExcludeTables), target.Select(c.cfg.ExcludeTables), c.cfg.SyncWorkers)
	return verifyReport(rep), err
}

// ---- The leader: the runs this node leads ----

// prepareFor is how long the leader gives nodes, between announcing the
// pause and starting it, to open their connections to the new database.
const prepareFor = 300 * time.Millisecond

// afterSwitchTimeout bounds the leader's work after the switch (sealing the
// old database, validating foreign keys).
const afterSwitchTimeout = 5 * time.Minute

// leader starts and stops the runs this node leads.
//
// Goroutines: one per run it leads (leaderRun.lead), started when the node
// sees EXECUTE name it, ended by the run's outcome, a RESET, a failure
// declared by another node, or Close.
//
// Lock order: leader.mu is a leaf; it is taken under the node's reactMu.
type leader struct {
	*common
	node *node

	// testHook, if set, is called at each phase boundary of a run; tests use
	// it to inject faults at exact points.
	testHook func(ctx context.Context, phase string)

	mu      sync.Mutex
	running *leaderRun // the run this node leads, if any
	closed  bool
}

// leaderRun is one run this node leads.
type leaderRun struct {
	*leader
	run      int64
	cancel   context.CancelFunc
	done     chan struct{}
	progress *replicate.Progress

	sess *pgx.Conn // holds the exec lock for the whole run; the connection lock in the window
	sync *syncRun
	dst  *pgx.Conn // the final sync's session on the new database, opened before the window
}

// start starts leading the run, unless already doing so.
func (l *leader) start(run int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || (l.running != nil && l.running.run == run) {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	lr := &leaderRun{leader: l, run: run, cancel: cancel, done: make(chan struct{}), progress: &replicate.Progress{}}
	l.running = lr
	go func() {
		defer func() {
			l.mu.Lock()
			if l.running == lr {
				l.running = nil
			}
			l.mu.Unlock()
			close(lr.done)
		}()
		lr.lead(ctx)
	}()
}

// stop cancels the run this node leads (a RESET came, the run was failed,
// or Close): its sessions end, which releases its locks; the resetter cleans
// up. wait waits for the run's goroutine to end (Close only: the run may
// itself be waiting to observe a message).
func (l *leader) stop(wait bool) {
	l.mu.Lock()
	lr := l.running
	l.running = nil
	l.mu.Unlock()
	if lr != nil {
		lr.cancel()
		if wait {
			<-lr.done
		}
	}
}

// close stops leading for good.
func (l *leader) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.stop(true)
}

// leads reports whether this node is leading the run.
func (l *leader) leads(run int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.running != nil && l.running.run == run
}

// progress returns the progress of the run this node leads, if any.
func (l *leader) progress() *Progress {
	l.mu.Lock()
	lr := l.running
	l.mu.Unlock()
	if lr == nil {
		return nil
	}
	p := progressOf(lr.progress.Snapshot())
	return &p
}

// at calls the test hook at a phase boundary of the leader's run.
func (l *leader) at(ctx context.Context, phase string) {
	if l.testHook != nil {
		l.testHook(ctx, phase)
	}
}

// lead runs the run: sync, window, commit, after the switch. It holds the
// exec lock throughout, on its own session, so that no RESET cleans up under
// its feet and no other leader can run. If the run fails (rather than being
// cancelled by a RESET), it reports the failure, which resumes every node on
// the old database, and cleans up, still under the exec lock.
func (lr *leaderRun) lead(ctx context.Context) {
	sess, err := lr.connect(ctx, lr.old, roleLock)
	if err != nil {
		lr.failed(err)
		return
	}
	defer closeBounded(sess)
	if err := lr.keys.lockExclusive(ctx, sess, lockExec, 30*time.Second); err != nil {
		lr.failed(fmt.Errorf("take the execution lock (held by %s): %w", lr.keys.holders(ctx, sess, lockExec), err))
		return
	}
	lr.sess = sess
	err = lr.steps(ctx)
	if lr.dst != nil {
		closeBounded(lr.dst)
	}
	if lr.sync != nil {
		lr.sync.closeSessions()
	}
	if err != nil && ctx.Err() == nil {
		lr.failed(err)
	}
}

// steps are the run, in order.
func (lr *leaderRun) steps(leadCtx context.Context) error {
	if err := lr.syncData(leadCtx); err != nil {
		return err
	}
	if err := lr.announce(leadCtx); err != nil {
		return err
	}
	// The window has a deadline on both sides: here, and on the server,
	// which ends the leader's session (and so the window) if this process
	// stalls inside it.
	window := lr.cfg.PauseBudget + lr.cfg.FinalTimeout + 5*time.Second
	ctx, cancel := context.WithTimeout(leadCtx, window)
	defer cancel()
	defer func() { // after the commit, or on a failure: the window ends (unlocking a lock not held is harmless)
		uctx, ucancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer ucancel()
		_ = lr.keys.unlock(uctx, lr.sess, lockConn)
	}()
	pauseStart, err := lr.pause(ctx, window)
	if err != nil {
		return err
	}
	res, err := lr.commit(ctx, pauseStart)
	if err != nil {
		return err
	}
	cancel()
	lr.at(leadCtx, "switched")
	// After the switch, without blocking the service: outside the window's
	// deadline, but bounded, and ended by Close.
	after, afterCancel := context.WithTimeout(leadCtx, afterSwitchTimeout)
	defer afterCancel()
	lr.afterSwitch(after, res)
	return nil
}

// stillRunning refuses an append unless the last message is the run's kind.
func (lr *leaderRun) stillRunning(kind string) func(*msglog.Message) error {
	return func(last *msglog.Message) error {
		if last == nil || last.Run != lr.run || last.Kind != kind {
			return errors.New("the run was reset or failed meanwhile")
		}
		return nil
	}
}

// appendObserved appends a message of the run on the leader's session and
// applies it at once: the append checked that it follows what the node has
// seen, so it need not wait for the notification.
func (lr *leaderRun) appendObserved(ctx context.Context, kind string, data any, after string) error {
	m, err := lr.node.msgs.Append(ctx, lr.sess, lr.node.id, kind, lr.run, data, lr.stillRunning(after))
	if err != nil {
		return err
	}
	lr.node.observe(m)
	return nil
}

// syncData is the sync: the data moves while the service runs. The guard
// stops every sync step of this run as soon as the leader's session no
// longer holds the exec lock (a RESET took over).
func (lr *leaderRun) syncData(ctx context.Context) error {
	r, err := lr.check(ctx)
	if err != nil {
		return err
	}
	lr.sync = r
	r.eng.Progress = lr.progress
	r.eng.FinalTimeout = lr.cfg.FinalTimeout
	r.eng.LockBudget = lr.cfg.PauseBudget
	r.eng.Guard = fmt.Sprintf("SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE %s AND l.granted AND l.pid = %d)",
		lr.keys.on(lockExec), lr.sess.PgConn().PID())
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
		start := time.Now()
		if err := step.fn(ctx); err != nil {
			return fmt.Errorf("%s: %w", step.name, err)
		}
		lr.log.Debug("sync step done", "step", step.name, "took", time.Since(start))
		lr.at(ctx, step.name)
	}
	lr.dst, err = replicate.Connect(ctx, r.eng.Dst) // opened now: the window should not wait for it
	if err != nil {
		return err
	}
	// A refused kind of object that appeared during the run (a prepared
	// transaction holding the change table, say) would make the final sync
	// refuse anyway: say so before the service pauses for nothing.
	return r.refusedNow(ctx)
}

// announce tells the nodes that the pause is near, so that they open their
// connections to the new database now, and catches up meanwhile.
func (lr *leaderRun) announce(ctx context.Context) error {
	if err := lr.appendObserved(ctx, msglog.KindPrepare, nil, msglog.KindExecute); err != nil {
		return err
	}
	warmUntil := time.Now().Add(prepareFor)
	// With no application connection to the old database there is nothing
	// to pre-open (an idle database, a service not started yet).
	var apps int
	if err := lr.sess.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name ~ $1",
		lr.sessionsOf(roleApp)).Scan(&apps); err == nil && apps == 0 {
		warmUntil = time.Now()
	}
	if err := lr.sync.catchUp(ctx); err != nil {
		return fmt.Errorf("incremental sync: %w", err)
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Until(warmUntil)):
	}
	if err := lr.sync.catchUp(ctx); err != nil {
		return fmt.Errorf("incremental sync: %w", err)
	}
	// Partitions a premaking job created during the run: the final sync
	// locks them first (see replicate.Engine.FindPremade).
	if err := lr.sync.eng.FindPremade(ctx, lr.sync.incSrc); err != nil {
		return fmt.Errorf("incremental sync: %w", err)
	}
	return nil
}

// pause opens the window: every node drains, and the connection lock comes
// when the last application connection to the old database has gone. On
// success the leader's session holds the connection lock.
func (lr *leaderRun) pause(ctx context.Context, window time.Duration) (time.Time, error) {
	budget, finalBudget := lr.cfg.PauseBudget, lr.cfg.FinalTimeout
	if _, err := lr.sess.Exec(ctx, `SELECT set_config('idle_in_transaction_session_timeout', $1, false),
	CASE WHEN current_setting('server_version_num')::int >= 140000 THEN set_config('idle_session_timeout', $1, false) END`,
		fmt.Sprintf("%dms", window.Milliseconds())); err != nil {
		return time.Time{}, err
	}
	lr.progress.SetPhase(replicate.PhasePausing, 0, 0)
	start := time.Now()
	if err := lr.appendObserved(ctx, msglog.KindPause, pauseData{BudgetMS: budget.Milliseconds(), FinalMS: finalBudget.Milliseconds()}, msglog.KindPrepare); err != nil {
		return start, err
	}
	lr.log.Debug("pause announced", "after", time.Since(start))
	lr.at(ctx, "pausing")
	if err := lr.keys.lockExclusive(ctx, lr.sess, lockConn, budget); err != nil {
		if errors.Is(err, errLockTimeout) {
			return start, fmt.Errorf("%w (Config.PauseBudget %v): application connections to the old database still open: %s", ErrPauseBudget, budget,
				lr.keys.holders(ctx, lr.sess, lockConn))
		}
		return start, err
	}
	if err := lr.strayApplicationSessions(ctx); err != nil {
		return start, err
	}
	if err := lr.appendObserved(ctx, msglog.KindExecuting, nil, msglog.KindPause); err != nil {
		return start, err
	}
	lr.log.Debug("connection lock taken", "after", time.Since(start))
	lr.at(ctx, "locked")
	return start, nil
}

// commit makes the final sync and commits the switch: one transaction on
// the old database, which
//
//  1. locks the change table and reads the last changes (READ COMMITTED,
//     pinned: the reads are sent, and under REPEATABLE READ would take their
//     snapshot, before the LOCK has waited for the last writers, whose
//     changes they must see),
//  2. applies them to the new database and commits there (replicate's Final),
//  3. consumes the changes, marks the old database obsolete (switched_to),
//     makes it refuse writes, and appends "done" to the log,
//  4. commits with synchronous_commit on: the switch must survive a crash of
//     the old database.
//
// Its COMMIT is the switch: every node reads the mark or the "done" message.
func (lr *leaderRun) commit(ctx context.Context, pauseStart time.Time) (replicate.FinalResult, error) {
	budget, finalBudget := lr.cfg.PauseBudget, lr.cfg.FinalTimeout
	lr.progress.SetPhase(replicate.PhaseFinalSync, 0, 0)
	finalStart := time.Now()
	tx, err := lr.sess.BeginTx(ctx, pgx.TxOptions{BeginQuery: fmt.Sprintf(
		"BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = %[1]d; SET LOCAL lock_timeout = %[1]d; SET LOCAL synchronous_commit = on",
		finalBudget.Milliseconds())})
	if err != nil {
		return replicate.FinalResult{}, err
	}
	defer func() {
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer rcancel()
		_ = tx.Rollback(rctx)
	}()
	res, err := lr.sync.eng.Final(ctx, tx, lr.dst)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
		// Release what the final sync holds, so that only others are named.
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = tx.Rollback(rctx)
		rcancel()
		others := lr.sync.eng.LockedTables()
		what := "the change table"
		if len(others) > 0 {
			what += ", the partitioned tables or the partitions created during the run"
		}
		return res, fmt.Errorf("%w (Config.PauseBudget %v, for each lock): the final sync could not lock %s: %s", ErrPauseBudget, budget, what, lr.lockBlockers(others))
	}
	if err != nil {
		return res, err
	}
	lr.log.Debug("final sync committed on the new database", "after", time.Since(pauseStart), "changes", res.Changes, "final", res.Duration)
	lr.at(ctx, "final")

	// The identity recorded is the one the new database holds now, read on
	// it (a node starting meanwhile may have given it a new one).
	info, _, err := lr.meta.Read(ctx, lr.dst)
	if err != nil {
		return res, fmt.Errorf("read the new database's identity: %w", err)
	}
	to := info.ID
	lr.next.setInfo(info)
	msg := fmt.Sprintf("swo: database %s is obsolete: it was switched over to database %s; writes are refused. Use the new database.",
		lr.old.Info().ID, to)
	mark := append([]string{lr.meta.MarkSwitchedSQL(to)}, lr.sync.cap.RejectWritesSQL(msg)...)
	if res.Consume != "" {
		mark = append(mark, res.Consume)
	}
	done := doneData{To: to, PauseMS: time.Since(pauseStart).Milliseconds(), FinalMS: time.Since(finalStart).Milliseconds(), Changes: res.Changes}
	m, err := lr.node.msgs.AppendTx(ctx, tx, lr.node.id, msglog.KindDone, lr.run, done, lr.stillRunning(msglog.KindExecuting), mark...)
	if err != nil {
		return res, err
	}
	if err := tx.Commit(ctx); err != nil {
		return res, lr.commitOutcome(err)
	}
	_ = lr.keys.unlock(ctx, lr.sess, lockConn)
	lr.node.observe(m)
	lr.log.Info("switched", "pause", time.Since(pauseStart), "final_sync", time.Duration(done.FinalMS)*time.Millisecond,
		"final_changes", res.Changes)
	return res, nil
}

// afterSwitch freezes the old database's sequences and validates the new
// database's foreign keys (partitions created later in the old database
// are refused by the seal, which the switch's transaction turned on). The switch is done:
// a failure here is reported, not fatal.
func (lr *leaderRun) afterSwitch(ctx context.Context, res replicate.FinalResult) {
	r := lr.sync
	lr.progress.SetPhase(replicate.PhaseSealing, 0, 0)
	if err := r.eng.FreezeSequences(ctx, res); err != nil {
		lr.node.noteErr(fmt.Errorf("switched, but freezing sequences in the old database failed (nextval still works there): %w", err))
	}
	lr.progress.SetPhase(replicate.PhaseValidating, 0, 0)
	if err := r.eng.Finish(ctx); err != nil {
		lr.node.noteErr(fmt.Errorf("switched, but validating foreign keys in the new database failed: %w", err))
	}
	lr.progress.SetPhase(replicate.PhaseDone, 0, 0)
}

// failed reports a failed run and, if the leader's session still holds the
// exec lock, cleans up under it.
func (lr *leaderRun) failed(err error) {
	err = lr.scrub(err)
	lr.node.noteErr(fmt.Errorf("execution failed: %w", err))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sess := lr.sess
	conn := sess
	if conn == nil || conn.Ping(ctx) != nil {
		sess = nil // the exec lock went with the session: RESET cleans up
		var cerr error
		if conn, cerr = lr.connect(ctx, lr.old, roleCtl); cerr != nil {
			return // the old database is unreachable: the owner check fails the run later
		}
		defer closeBounded(conn)
	}
	_, aerr := lr.node.msgs.Append(ctx, conn, lr.node.id, msglog.KindFailed, lr.run, encodeFailure(err), runOpen(lr.run))
	lr.node.poke()
	if aerr != nil || sess == nil {
		return
	}
	// The window's server-side timeouts must not end the session (and the
	// exec lock with it) in the middle of the cleanup.
	if _, err := sess.Exec(ctx, `SELECT set_config('idle_in_transaction_session_timeout', '0', false),
	CASE WHEN current_setting('server_version_num')::int >= 140000 THEN set_config('idle_session_timeout', '0', false) END`); err != nil {
		return
	}
	cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer ccancel()
	if cerr := lr.cleanup(cctx); cerr != nil {
		lr.node.noteErr(fmt.Errorf("cleanup after the failed execution (RESET will retry): %w", cerr))
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

// commitOutcome decides, after the switch's COMMIT returned an error (the
// connection may have died with the COMMIT in flight), whether the switch
// committed: the old database's mark is the truth.
func (c *common) commitOutcome(commitErr error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := c.connect(ctx, c.old, roleCtl)
	if err != nil {
		return fmt.Errorf("commit of the switch: %w (outcome unknown: the old database is unreachable; RESET will tell)", commitErr)
	}
	defer closeBounded(conn)
	if info, _, err := c.meta.Read(ctx, conn); err == nil && info.Obsolete() {
		c.log.Warn("the switch committed although COMMIT reported an error", "error", commitErr)
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
func (lr *leaderRun) strayApplicationSessions(ctx context.Context) error {
	deadline := time.Now().Add(strayGrace)
	for {
		stray, err := lr.listStraySessions(ctx, lr.sess)
		if err != nil || len(stray) == 0 {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("application sessions on the old database lost the connection lock (pg_advisory_unlock_all or DISCARD ALL on a connector's connection?): %v; the switch is refused because they could write after it", stray)
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

func (c *common) listStraySessions(ctx context.Context, conn *pgx.Conn) ([]string, error) {
	rows, err := conn.Query(ctx, `SELECT a.pid || ' ' || a.application_name FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.application_name ~ $1
	AND a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')
	AND a.backend_start < statement_timestamp() - interval '1 second'
	AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND `+c.keys.on(lockConn)+`)`, c.sessionsOf(roleApp, roleAppNormal))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// Check is a dry run of RESET: it checks, without starting a run and
// without changing either database, what RESET and EXECUTE would check —
// the configuration, that both databases can be reached and are different
// databases, that neither is obsolete, that the library's schema can be
// created, the nodes already running, every precondition of the schemas,
// and the new database's content. It returns nil when a switchover could
// start, or an error that errors.Is ErrPreconditions and, with errors.As, a
// *PreconditionError listing every problem (and errors.Is ErrObsolete too
// when a database was switched away from). A service's CI can call it after
// every migration to keep its schema switchable.
func Check(ctx context.Context, cfg Config) error {
	s, err := standalone(cfg, "Check")
	if err != nil {
		return err
	}
	return s.public(s.dryRun(ctx))
}

// Verify is [Connector.Verify] without a connector: it compares the two
// databases of cfg and changes neither, joining no cluster (so a command
// need not share the nodes' settings beyond the exclusions it compares).
func Verify(ctx context.Context, cfg Config) (VerifyReport, error) {
	s, err := standalone(cfg, "Verify")
	if err != nil {
		return VerifyReport{}, err
	}
	rep, err := s.verify(ctx)
	return rep, s.public(err)
}

// standalone is the part of a connector that Check and Verify need: the
// configuration and both databases, no node, no router.
func standalone(cfg Config, what string) (*common, error) {
	s, err := newCommon(cfg)
	if err != nil {
		return nil, err
	}
	if s.next == nil {
		return nil, s.public(fmt.Errorf("%w: %s needs NextURL (--db-url-next): the database to switch over to", ErrConfig, what))
	}
	return s, nil
}

// dryRun is Check's work: every read RESET makes, none of its writes.
func (s *common) dryRun(ctx context.Context) error {
	var probs []Problem
	obsolete := false
	for _, e := range []*endpoint{s.old, s.next} {
		conn, err := s.connect(ctx, e, roleCtl)
		if err != nil {
			return err
		}
		ps, running, err := s.dryRunOn(ctx, conn, e)
		closeBounded(conn)
		if err != nil {
			return fmt.Errorf("%s database %s: %w", e.label, e.describe(), err)
		}
		probs = append(probs, ps...)
		if e.Info().Obsolete() {
			obsolete = true
		}
		if running != StateUnknown {
			// The new database is as the run left it (keys dropped for the
			// load, tables half filled): comparing it would mislead.
			return preconditions(append(probs, Problem{Object: "cluster", Issue: fmt.Sprintf(
				"a run is in progress (state %s): wait for its outcome, or press RESET, which cancels it and restores the new database; then check again", running)}))
		}
	}
	r, err := s.check(ctx)
	var pe *PreconditionError
	switch {
	case errors.As(err, &pe):
		probs = append(probs, pe.Problems...)
	case err != nil:
		return err
	default:
		if err := r.checkTarget(ctx); errors.Is(err, ErrTargetNotEmpty) {
			probs = append(probs, Problem{Object: "new database", Issue: err.Error()})
		} else if err != nil {
			return err
		}
	}
	if len(probs) > 0 {
		if obsolete {
			return fmt.Errorf("%w: %w", ErrObsolete, preconditions(probs))
		}
		return preconditions(probs)
	}
	return nil
}
