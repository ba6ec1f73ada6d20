package swo

import (
	"context"
	"fmt"
	"time"
	"weak"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// OpenPool opens a pgxpool whose connections follow the same rules as the
// connections of sql.OpenDB(c): each connection to the old database takes
// the shared connection lock and reads the switch state before it is used;
// during the pause new connections wait (no Acquire fails for it); at the
// switch the pool's connections to the old database are closed (idle ones
// at once, those in use when released) and every later connection goes to
// the new database; an obsolete database is refused with ErrObsolete.
//
// cfg may be nil (the pool settings then come from OldURL's pool_*
// parameters, or pgxpool's defaults). Where given, its pool settings and
// hooks are kept: BeforeConnect, AfterConnect, PrepareConn (or
// BeforeAcquire), AfterRelease and BeforeClose run as they would on a plain
// pool, AfterConnect after swo's lock and state read. Of cfg.ConnConfig, the
// pgx settings are kept (Tracer, statement and description caches,
// DefaultQueryExecMode, ConnectTimeout); where a connection goes (host,
// port, database, user, password, TLS, runtime parameters) is the
// connector's: OldURL's or NextURL's, adjusted by Config.BeforeConnect.
//
// One connector may serve a *sql.DB and any number of pools at once, as one
// node. Close the pool before the connector.
func (c *Connector) OpenPool(ctx context.Context, cfg *pgxpool.Config) (*pgxpool.Pool, error) {
	p, err := c.router.openPool(ctx, cfg)
	return p, c.public(err)
}

func (r *router) openPool(ctx context.Context, cfg *pgxpool.Config) (*pgxpool.Pool, error) {
	if r.closed.Load() {
		return nil, ErrClosed
	}
	var pc *pgxpool.Config
	if cfg == nil {
		var err error
		if pc, err = pgxpool.ParseConfig(r.cfg.OldURL); err != nil {
			return nil, fmt.Errorf("%w: OldURL (--db-url): %w", ErrConfig, err)
		}
	} else {
		pc = cfg.Copy()
	}
	role := roleApp
	if r.next == nil {
		role = roleAppNormal
	}
	host := pc.ConnConfig
	hostBefore, hostAfter := pc.BeforeConnect, pc.AfterConnect
	hostPrepare := pc.PrepareConn
	//lint:ignore SA1019 a host's deprecated hook is honoured as pgxpool honours it
	if hostPrepare == nil && pc.BeforeAcquire != nil {
		before := pc.BeforeAcquire //lint:ignore SA1019 as above
		hostPrepare = func(ctx context.Context, conn *pgx.Conn) (bool, error) { return before(ctx, conn), nil }
	}

	pc.ConnConfig = r.old.url.Copy()
	keepHostSettings(pc.ConnConfig, host)
	pc.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
		rt, err := r.wait(ctx)
		if err != nil {
			return r.public(err)
		}
		e := r.old
		switch rt.target {
		case toNext:
			e = r.next
		case refused:
			if time.Since(rt.at) < refreshEvery {
				return r.public(rt.err)
			}
			if r.switched(rt.to); r.route.Load().target != toNext {
				return r.public(r.route.Load().err)
			}
			e = r.next
		}
		timeout := cc.ConnectTimeout
		if err := r.adjust(ctx, e, role, cc, func(cc *pgx.ConnConfig) { keepHostSettings(cc, host) }); err != nil {
			return r.public(err)
		}
		if cc.ConnectTimeout <= 0 {
			cc.ConnectTimeout = timeout // pgxpool's bound on a connect that outlives its Acquire
		}
		if hostBefore != nil {
			name := cc.RuntimeParams["application_name"]
			if err := hostBefore(ctx, cc); err != nil {
				return err
			}
			if cc.RuntimeParams == nil {
				cc.RuntimeParams = map[string]string{}
			}
			cc.RuntimeParams["application_name"] = name // the marker by which the leader finds the application's sessions
			if !sameTarget(cc, e.url) {
				return r.public(fmt.Errorf("%w: the pool's BeforeConnect changed where a connection to the %s database goes: "+
					"swo decides that (OldURL or NextURL)", ErrConfig, e.label))
			}
		}
		return nil
	}
	pc.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
		e := r.old
		if r.next != nil && !sameTarget(conn.Config(), r.old.url) {
			e = r.next
		}
		to, err := r.admit(ctx, e, conn.PgConn())
		if err != nil {
			return r.public(err)
		}
		if to != uuid.Nil {
			// Switched meanwhile: this connection must not be used. Closed,
			// PrepareConn refuses it and the pool opens another, which goes
			// to the new database.
			r.switched(to)
			_ = conn.Close(ctx)
			return nil
		}
		if err := r.afterConnect(ctx, conn); err != nil {
			return r.public(err)
		}
		if hostAfter != nil {
			if err := hostAfter(ctx, conn); err != nil {
				return err
			}
		}
		if rt := r.route.Load(); e == r.old && (rt.paused != nil || rt.target != toOld) {
			// A pause or the switch began while it was being set up: its
			// drain did not see it. Closed, PrepareConn refuses it.
			_ = conn.Close(ctx)
		}
		return nil
	}
	pc.PrepareConn = func(ctx context.Context, conn *pgx.Conn) (bool, error) {
		if conn.IsClosed() {
			return false, nil
		}
		if hostPrepare != nil {
			return hostPrepare(ctx, conn)
		}
		return true, nil
	}
	pc.BeforeAcquire = nil //lint:ignore SA1019 PrepareConn replaces it (and calls it)

	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed.Load() {
		pool.Close()
		return nil, ErrClosed
	}
	r.pools[weak.Make(pool)] = struct{}{}
	if rt := r.route.Load(); rt.paused != nil || rt.target != toOld {
		pool.Reset() // a connection it opened may predate the drain
	}
	return pool, nil
}

// keepHostSettings copies into cc the pgx settings of the host's pool
// configuration that do not decide where a connection goes.
func keepHostSettings(cc, host *pgx.ConnConfig) {
	if host == nil {
		return
	}
	cc.Tracer = host.Tracer
	cc.StatementCacheCapacity = host.StatementCacheCapacity
	cc.DescriptionCacheCapacity = host.DescriptionCacheCapacity
	cc.DefaultQueryExecMode = host.DefaultQueryExecMode
	if host.ConnectTimeout > 0 {
		cc.ConnectTimeout = host.ConnectTimeout
	}
}

// sameTarget reports whether two configurations reach the same database
// (by address, database and user).
func sameTarget(a, b *pgx.ConnConfig) bool {
	return a.Host == b.Host && a.Port == b.Port && a.Database == b.Database && a.User == b.User
}
