// Command service is a small to-do list HTTP service that can move live
// between PostgreSQL databases with swo, and an example of how a host
// service wires swo in: configuration from flags and the environment, its
// own schema migrations, a pgx pool from the connector for its API, and
// the switchover admin page at /admin/switchover (admin.go, admin.html:
// copy them).
//
//	service --db-url=postgres://… [--db-url-next=postgres://…] --listen=:8081 --node-name=web-1
//	service --db-url-next=postgres://… --migrate-next   # migrate the next database, then exit
//
// TODO_DB_URL and TODO_DB_URL_NEXT set the URLs too (the flags win).
// Several processes started with the same URLs form one switchover
// cluster. The admin routes must sit behind the host's own authentication;
// this example has none. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo"
)

// envPrefix is the prefix of the environment variables: TODO_DB_URL and
// TODO_DB_URL_NEXT.
const envPrefix = "TODO"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "service:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	var cfg swo.Config
	cfg.LoadEnv(envPrefix) // defaults for the flags below
	fs := flag.NewFlagSet("service", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	listen := fs.String("listen", ":8080", "address to serve HTTP on")
	fs.StringVar(&cfg.NodeName, "node-name", "", "this instance's name on the switchover page (default: host name and process id)")
	migrateNext := fs.Bool("migrate-next", false, "apply the migrations to the database of --db-url-next, then exit (before a switchover)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: service [flags]\n\nA to-do list service that can switch databases live (github.com/pgswo/swo).\n"+
			"%s_DB_URL and %s_DB_URL_NEXT set the URLs too; the flags win.\n\n", envPrefix, envPrefix)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if cfg.NodeName != "" {
		log = log.With("node", cfg.NodeName)
	}
	slog.SetDefault(log)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *migrateNext {
		if cfg.NextURL == "" {
			return fmt.Errorf("--migrate-next needs --db-url-next (or %s_DB_URL_NEXT)", envPrefix)
		}
		n, err := migrateURL(ctx, cfg.NextURL)
		if err != nil {
			return err
		}
		log.Info("the next database is migrated", "applied", n, "version", len(migrations)-1)
		return nil
	}
	if cfg.OldURL == "" {
		return fmt.Errorf("--db-url (or %s_DB_URL) is required", envPrefix)
	}

	a, err := newApp(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer a.Close()
	srv := &http.Server{Addr: *listen, Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	log.Info("serving", "addr", ln.Addr().String(), "admin", "/admin/switchover", "mode", a.conn.Status().Mode)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// app is one instance of the service: its connector (its node of the
// switchover cluster), the pool its API uses, and its HTTP routes.
type app struct {
	conn *swo.Connector
	pool *pgxpool.Pool
	mux  *http.ServeMux
}

// newApp connects through swo, applies the migrations to the database the
// connector routes to (the old one until the switch), and builds the
// routes. It refuses a database that was switched away from.
func newApp(ctx context.Context, cfg swo.Config, log *slog.Logger) (*app, error) {
	cfg.Logger = log
	// The migrations' bookkeeping is not data to move: the new database has
	// its own, from --migrate-next. Every instance sets the same list, as
	// the nodes must agree on it.
	cfg.ExcludeTables = append(cfg.ExcludeTables, migrationsTable)
	c, err := swo.NewConnector(ctx, cfg)
	if errors.Is(err, swo.ErrObsolete) {
		return nil, fmt.Errorf("%w\n(the switch is done: restart with --db-url=<the new database> and without --db-url-next)", err)
	}
	if err != nil {
		return nil, err
	}
	// The API uses a pgx pool from the connector; a database/sql service
	// would use sql.OpenDB(c) instead. Both follow the switch the same way.
	pool, err := c.OpenPool(ctx, nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	if n, err := migrate(ctx, pool); err != nil {
		pool.Close()
		c.Close()
		return nil, err
	} else if n > 0 {
		log.Info("migrated the database", "applied", n, "version", len(migrations)-1)
	}
	a := &app{conn: c, pool: pool, mux: http.NewServeMux()}
	(&api{pool: pool, log: log}).routes(a.mux)
	// Behind the host's authentication in a real service: this example has
	// none, so run it on a trusted network only.
	a.mux.Handle("/admin/switchover/", http.StripPrefix("/admin/switchover", AdminHandler(c)))
	a.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		s := c.Status()
		writeJSON(w, http.StatusOK, map[string]any{"node": s.Node.Name, "mode": s.Mode, "state": s.State, "routing": s.Routing})
	})
	return a, nil
}

// Handler is the service's HTTP handler.
func (a *app) Handler() http.Handler { return a.mux }

// Close closes the pool, then the connector (in that order).
func (a *app) Close() {
	a.pool.Close()
	a.conn.Close()
}
