package swo

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/capture"
	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/meta"
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
func (c *Connector) syncConfig(e *endpoint) *pgx.ConnConfig {
	cfg := e.cfg.Copy()
	cfg.RuntimeParams["application_name"] = c.appName(e, roleSync)
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
	srcFull, err := schema.Read(ctx, src, opts)
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
			Src: c.syncConfig(c.old), Dst: c.syncConfig(c.next),
			Schema: c.cfg.Namespace, Source: source, Target: target,
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
	if len(filled) == 0 {
		return nil
	}
	info, _, err := r.c.meta.Read(ctx, dst)
	if err != nil {
		return err
	}
	ours := info.FilledFrom == r.c.old.info.ID && info.FilledFrom != uuid.Nil
	only := *r.eng.Source
	only.Tables = nil
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
	return r.eng.Prepare(ctx, conn, r.keep, mark)
}

// initialCopy copies the data and rebuilds the target's indexes.
func (r *syncRun) initialCopy(ctx context.Context) error {
	if err := r.eng.InitialCopy(ctx); err != nil {
		return err
	}
	return r.eng.RebuildIndexes(ctx)
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

// final runs the last round inside the pause, in oldTx (which the caller
// commits after marking the switch in it); see replicate.Engine.Final.
func (r *syncRun) final(ctx context.Context, oldTx pgx.Tx, dst *pgx.Conn) (replicate.FinalResult, error) {
	return r.eng.Final(ctx, oldTx, dst)
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
	if err := replicate.Undo(ctx, c.syncConfig(c.next), c.cfg.Namespace); err != nil {
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
	src, err := replicate.Connect(ctx, c.syncConfig(c.old))
	if err != nil {
		return VerifyReport{}, c.scrub(err)
	}
	defer src.Close(context.Background())
	dst, err := replicate.Connect(ctx, c.syncConfig(c.next))
	if err != nil {
		return VerifyReport{}, c.scrub(err)
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
	rep, err := replicate.Verify(ctx, c.syncConfig(c.old), c.syncConfig(c.next),
		source.Select(c.cfg.ExcludeTables), target.Select(c.cfg.ExcludeTables), c.cfg.SyncWorkers)
	return rep, c.scrub(err)
}
