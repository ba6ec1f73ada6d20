package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/pgswo/swo/internal/schema"
)

// Undo record kinds, in the order Undo applies them.
const (
	undoTruncate   = "truncate"   // a table the run loaded: emptied on abort
	undoConstraint = "constraint" // primary key, unique or exclusion constraint
	undoIndex      = "index"      // plain index
	undoFK         = "fk"         // foreign key
	undoTrigger    = "trigger"    // user trigger to enable again
	undoValidate   = "validate"   // foreign key re-added NOT VALID, still to validate
	undoMatView    = "matview"    // materialized view the run refreshed: refreshed again (or emptied) on abort

	// kept is not undone: a table whose rows equalled the source's, which the
	// run loaded again and an abort leaves filled. The record outlives Undo:
	// those rows are the source's, written by swo, and a later RESET may
	// clear them (KeptFrom) once the source has moved on.
	kept = "kept"
)

// undoTable creates the target's undo table. Every object the engine drops or
// disables on the target is recorded there, in the same transaction, with the
// statement that restores it; each restoration deletes its record in its own
// transaction. So whatever fails or dies, Undo can put the target back.
func (e *Engine) undoTable() string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s (
	id      serial PRIMARY KEY,
	tbl     text NOT NULL,
	kind    text NOT NULL,
	name    text NOT NULL,
	restore text NOT NULL,
	src     uuid -- for loaded tables: the database they were loaded from
);
CREATE TABLE IF NOT EXISTS %s (
	one     boolean PRIMARY KEY DEFAULT true CHECK (one),
	commits bigint NOT NULL -- the run's committed transactions on the target (see Engine.applied)
)`, e.q("target_undo"), e.q("target_applied"))
}

// bumpSQL counts, in a transaction that writes the run's data to the
// target, that transaction among the run's commits.
func (e *Engine) bumpSQL() string {
	return "UPDATE " + e.q("target_applied") + " SET commits = commits + 1"
}

type undoRecord struct {
	id                       int32
	tbl, kind, name, restore string // tbl: quoted qualified name
}

func (e *Engine) undoRecords(ctx context.Context, conn *pgx.Conn, kinds ...string) ([]undoRecord, error) {
	if _, err := conn.Exec(ctx, e.undoTable()); err != nil {
		return nil, err
	}
	rows, err := conn.Query(ctx, "SELECT id, tbl, kind, name, restore FROM "+e.q("target_undo")+" WHERE kind = ANY($1) ORDER BY id", kinds)
	if err != nil {
		return nil, err
	}
	return collectUndo(rows)
}

// Prepare readies the target for the initial copy (see the package doc):
// records and drops foreign keys, key, unique and exclusion constraints and
// indexes, disables user triggers, and truncates the tables. The tables in
// e.Keep, whose content was already identical to the source's, are not
// truncated here: the copy replaces their rows in one transaction, so an
// abort leaves them with their rows. also, if not nil, runs in the same
// transaction (the caller's marks).
func (e *Engine) Prepare(ctx context.Context, conn *pgx.Conn, also func(context.Context, pgx.Tx) error) error {
	pending, err := e.undoRecords(ctx, conn, undoTruncate, undoConstraint, undoIndex, undoFK, undoTrigger, undoValidate, undoMatView)
	if err != nil {
		return fmt.Errorf("prepare target: %w", err)
	}
	if len(pending) > 0 {
		return fmt.Errorf("prepare target: %d objects of an earlier run are still to be restored: RESET first", len(pending))
	}
	b := &pgx.Batch{}
	record := func(t *schema.Table, kind, name, restore, action string) {
		b.Queue("INSERT INTO "+e.q("target_undo")+" (tbl, kind, name, restore) VALUES ($1, $2, $3, $4)", t.QName(), kind, name, restore)
		if action != "" {
			b.Queue(action)
		}
	}
	var targets []*schema.Table
	for _, s := range e.Source.Tables {
		targets = append(targets, e.target(s))
	}
	for _, t := range targets { // foreign keys first: they depend on the keys dropped next
		for _, c := range t.ForeignKeys() {
			if !c.Inherited {
				record(t, undoFK, c.Name, addConstraint(t, c), dropConstraint(t, c))
			}
		}
	}
	for _, t := range targets {
		for _, c := range t.Constraints {
			if c.Inherited {
				continue // a partition's keys belong to its parent's: they stay in place
			}
			switch c.Kind {
			case 'p', 'u', 'x':
				record(t, undoConstraint, c.Name, restoreKey(t, c), dropConstraint(t, c))
			}
		}
		if !t.Partition {
			for _, ix := range t.Indexes {
				record(t, undoIndex, ix.Name, ix.Def, "DROP INDEX "+pgx.Identifier{t.Schema, ix.Name}.Sanitize())
			}
		}
		for _, tg := range t.Triggers {
			if tg.Enabled == 'D' {
				continue
			}
			mode := map[byte]string{'O': "", 'R': "REPLICA ", 'A': "ALWAYS "}[tg.Enabled]
			name := pgx.Identifier{tg.Name}.Sanitize()
			record(t, undoTrigger, tg.Name,
				fmt.Sprintf("ALTER TABLE %s ENABLE %sTRIGGER %s", t.QName(), mode, name),
				fmt.Sprintf("ALTER TABLE %s DISABLE TRIGGER %s", t.QName(), name))
		}
	}
	for _, m := range e.Source.MatViews {
		if d := e.Target.MatView(m.String()); d != nil {
			b.Queue("INSERT INTO "+e.q("target_undo")+" (tbl, kind, name, restore) VALUES ($1, $2, $3, $4)",
				d.QName(), undoMatView, d.String(), refresh(d, d.Populated))
		}
	}
	var names []string
	b.Queue("DELETE FROM "+e.q("target_undo")+" WHERE kind = $1", kept)
	for _, t := range targets {
		if !e.Keep[t.String()] {
			names = append(names, t.QName())
			b.Queue("INSERT INTO "+e.q("target_undo")+" (tbl, kind, name, restore, src) VALUES ($1, $2, $3, $4, $5)",
				t.QName(), undoTruncate, t.String(), "TRUNCATE ONLY "+t.QName(), e.SourceID)
		} else {
			b.Queue("INSERT INTO "+e.q("target_undo")+" (tbl, kind, name, restore, src) VALUES ($1, $2, $3, '', $4)",
				t.QName(), kept, t.String(), e.SourceID)
		}
	}
	if len(names) > 0 {
		b.Queue(truncateOnly(names))
	}
	// The count of the run's commits on the target starts again.
	b.Queue("DELETE FROM " + e.q("target_applied"))
	b.Queue("INSERT INTO " + e.q("target_applied") + " (commits) VALUES (0)")
	e.applied.Store(0)
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := tx.SendBatch(ctx, b).Close(); err != nil || also == nil {
			return err
		}
		return also(ctx, tx)
	})
	if err != nil {
		return fmt.Errorf("prepare target: %w", err)
	}
	return nil
}

// truncateOnly empties the named tables and none of their inheritance
// children (ONLY binds to one name of a list, so each gets its own).
func truncateOnly(qnames []string) string {
	return "TRUNCATE ONLY " + strings.Join(qnames, ", ONLY ")
}

func dropConstraint(t *schema.Table, c schema.Constraint) string {
	return fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT %s", t.QName(), pgx.Identifier{c.Name}.Sanitize())
}

func addConstraint(t *schema.Table, c schema.Constraint) string {
	return fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s %s", t.QName(), pgx.Identifier{c.Name}.Sanitize(), c.Def)
}

// restoreKey rebuilds a key constraint: for primary keys and unique
// constraints, the index first (a CREATE INDEX, which can run beside others
// on the same table) and then the constraint on it (a catalog change).
func restoreKey(t *schema.Table, c schema.Constraint) string {
	if c.Kind == 'x' || c.IndexDef == "" {
		return addConstraint(t, c)
	}
	kind := "PRIMARY KEY"
	if c.Kind == 'u' {
		kind = "UNIQUE"
	}
	attrs := ""
	if c.Deferrable {
		attrs = " DEFERRABLE"
		if c.Deferred {
			attrs += " INITIALLY DEFERRED"
		}
	}
	name := pgx.Identifier{c.Name}.Sanitize()
	return fmt.Sprintf("%s;\nALTER TABLE %s ADD CONSTRAINT %s %s USING INDEX %s%s", c.IndexDef, t.QName(), name, kind, name, attrs)
}

// refresh is the statement that leaves a materialized view populated from
// its query, or unpopulated.
func refresh(m *schema.MatView, populated bool) string {
	if populated {
		return "REFRESH MATERIALIZED VIEW " + m.QName()
	}
	return "REFRESH MATERIALIZED VIEW " + m.QName() + " WITH NO DATA"
}

// RefreshMatViews computes the target's materialized views from the copied
// rows, each after those it reads, and leaves unpopulated those that are
// unpopulated in the source. The target serves no one yet, so the refresh
// blocks nothing. It runs with the database's own settings, not the sync's
// (a view's query may depend on TimeZone or DateStyle as the service's do).
func (e *Engine) RefreshMatViews(ctx context.Context) error {
	order := e.Source.RefreshOrder()
	if len(order) == 0 {
		return nil
	}
	conn, err := connectPlain(ctx, e.Dst)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	e.progress().SetPhase(PhaseRefreshMatViews, int64(len(order)), 0)
	for _, m := range order {
		e.progress().SetTable(m.String())
		if _, err := conn.Exec(ctx, refresh(m, m.Populated)); err != nil {
			return fmt.Errorf("refresh materialized view %s in the new database: %w", m, err)
		}
		e.progress().Add(1, 0)
	}
	return nil
}

// restoreParallel applies undo records, one table per worker at a time.
func (e *Engine) restoreParallel(ctx context.Context, recs []undoRecord, what string) error {
	byTable := map[string][]undoRecord{}
	var order []string
	for _, r := range recs {
		if _, ok := byTable[r.tbl]; !ok {
			order = append(order, r.tbl)
		}
		byTable[r.tbl] = append(byTable[r.tbl], r)
	}
	e.progress().SetPhase(what, int64(len(recs)), 0)
	work := make(chan string)
	g, gctx := errgroup.WithContext(ctx)
	for i := 0; i < min(e.workers(), len(order)); i++ {
		g.Go(func() error {
			conn, err := Connect(gctx, e.Dst)
			if err != nil {
				return err
			}
			defer conn.Close(context.Background())
			if _, err := conn.Exec(gctx, "SELECT set_config('maintenance_work_mem', $1, false)", e.maintenanceWorkMem()); err != nil {
				return err
			}
			for tbl := range work {
				e.progress().SetTable(tbl)
				if err := e.applyAll(gctx, conn, byTable[tbl], what, true); err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error { return feed(gctx, work, order) })
	return g.Wait()
}

// applyUndo runs one record's restore statement and deletes the record, in
// one transaction.
func (e *Engine) applyUndo(ctx context.Context, conn *pgx.Conn, r undoRecord) error {
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, r.restore); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "DELETE FROM "+e.q("target_undo")+" WHERE id = $1", r.id)
		return err
	})
}

// queueFinish queues what the final target transaction does besides the
// rows: foreign keys come back NOT VALID (checked for new rows from now on,
// existing rows validated after the switch) and triggers are enabled again.
// The records of loaded tables stay until Finish: if the switch does not
// commit after all, an abort still empties them.
func (e *Engine) queueFinish(b *pgx.Batch, recs []undoRecord) {
	for _, r := range recs {
		switch r.kind {
		case undoFK:
			b.Queue(r.restore + " NOT VALID")
			validate := fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", r.tbl, pgx.Identifier{r.name}.Sanitize())
			b.Queue("INSERT INTO "+e.q("target_undo")+" (tbl, kind, name, restore) VALUES ($1, $2, $3, $4)", r.tbl, undoValidate, r.name, validate)
		case undoTrigger:
			b.Queue(r.restore)
		}
	}
	b.Queue("DELETE FROM "+e.q("target_undo")+" WHERE kind = ANY($1)", []string{undoFK, undoTrigger})
}

func collectUndo(rows pgx.Rows) ([]undoRecord, error) {
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (undoRecord, error) {
		var u undoRecord
		return u, r.Scan(&u.id, &u.tbl, &u.kind, &u.name, &u.restore)
	})
}

// Finish runs after the switch committed: the target is live, its loaded
// tables are no longer the run's to empty, and the foreign keys re-added NOT
// VALID by the final sync are validated. VALIDATE CONSTRAINT takes SHARE
// UPDATE EXCLUSIVE locks, which do not block the application's reads or
// writes.
func (e *Engine) Finish(ctx context.Context) error {
	conn, err := Connect(ctx, e.Dst)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "DELETE FROM "+e.q("target_undo")+" WHERE (kind = $1 AND src = $2) OR kind = $3", undoTruncate, e.SourceID, undoMatView); err != nil {
		return err
	}
	recs, err := e.undoRecords(ctx, conn, undoValidate)
	if err != nil {
		return err
	}
	// In parallel, a table per worker: each validation scans its table.
	return e.restoreParallel(ctx, recs, PhaseValidating)
}

// Undo puts the target back as it was before Prepare: it empties the tables
// loaded from source (the database identity of the run's source; tables
// loaded from another database are never emptied: this one may have become
// live since), restores keys, indexes and foreign keys, enables the
// triggers, validates pending foreign keys, computes the materialized views
// the run refreshed again from the restored tables, and runs also. It is idempotent
// and needs nothing but the target's undo table, so it works after any
// failure, on any node. The caller must make sure the switch did not commit:
// after it, the target is the live database.
func Undo(ctx context.Context, dst *pgx.ConnConfig, librarySchema string, source uuid.UUID, also func(context.Context, pgx.Tx) error) error {
	e := &Engine{Dst: dst, Schema: librarySchema}
	conn, err := Connect(ctx, dst)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", librarySchema+".target_undo").Scan(&exists); err != nil {
		return err
	}
	if !exists {
		return nil
	}
	rows, err := conn.Query(ctx, "SELECT id, tbl, kind, name, restore FROM "+e.q("target_undo")+" WHERE kind = $1 AND src = $2 ORDER BY id",
		undoTruncate, source)
	if err != nil {
		return err
	}
	trunc, err := collectUndo(rows)
	if err != nil {
		return err
	}
	if len(trunc) > 0 {
		names := make([]string, len(trunc))
		ids := make([]int32, len(trunc))
		for i, r := range trunc {
			names[i] = r.tbl
			ids[i] = r.id
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, truncateOnly(names)); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "DELETE FROM "+e.q("target_undo")+" WHERE id = ANY($1)", ids)
			return err
		})
		if err != nil {
			return fmt.Errorf("empty the tables loaded by the run: %w", err)
		}
	}
	for _, kinds := range [][]string{{undoConstraint, undoIndex}, {undoFK}, {undoTrigger}, {undoValidate}, {undoMatView}} {
		recs, err := e.undoRecords(ctx, conn, kinds...)
		if err != nil {
			return err
		}
		apply := conn
		if kinds[0] == undoMatView && len(recs) > 0 { // with the database's own settings, as RefreshMatViews
			if apply, err = connectPlain(ctx, dst); err != nil {
				return err
			}
			defer apply.Close(context.Background())
		}
		var errs []error
		for _, r := range recs {
			if err := e.applyUndo(ctx, apply, r); err != nil {
				errs = append(errs, fmt.Errorf("restore %s %s on %s: %w", r.kind, r.name, r.tbl, err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	if also == nil {
		return nil
	}
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error { return also(ctx, tx) })
}

// PendingFinish reports how much of the target's work after the switch
// Finish has still to do: foreign keys re-added NOT VALID by a final sync,
// to validate, and the records Finish forgets (of the tables loaded from
// source, and of the materialized views). Those records, left behind by a
// leader that died before Finish, would make this database, were it a
// switchover's target again, refuse its Prepare for good (the next run's
// Undo keeps another source's records).
func PendingFinish(ctx context.Context, conn *pgx.Conn, librarySchema string, source uuid.UUID) (int, error) {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", librarySchema+".target_undo").Scan(&exists); err != nil || !exists {
		return 0, err
	}
	var n int
	err := conn.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{librarySchema, "target_undo"}.Sanitize()+
		" WHERE kind = ANY($1) OR (kind = $2 AND src = $3)", []string{undoValidate, undoMatView}, undoTruncate, source).Scan(&n)
	return n, err
}

// KeptFrom names the target's tables (schema.name) that a run from source
// loaded again because their rows equalled the source's, and left filled
// when it was undone: their rows were written by swo.
func KeptFrom(ctx context.Context, conn *pgx.Conn, librarySchema string, source uuid.UUID) (map[string]bool, error) {
	out := map[string]bool{}
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", librarySchema+".target_undo").Scan(&exists); err != nil || !exists {
		return out, err
	}
	rows, err := conn.Query(ctx, "SELECT name FROM "+pgx.Identifier{librarySchema, "target_undo"}.Sanitize()+" WHERE kind = $1 AND src = $2", kept, source)
	if err != nil {
		return nil, err
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	for _, n := range names {
		out[n] = true
	}
	return out, err
}

// Pending reports how many target objects are still to be restored (tests and Status).
func Pending(ctx context.Context, conn *pgx.Conn, librarySchema string) (int, error) {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", librarySchema+".target_undo").Scan(&exists); err != nil || !exists {
		return 0, err
	}
	var n int
	err := conn.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{librarySchema, "target_undo"}.Sanitize()).Scan(&n)
	return n, err
}
