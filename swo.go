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
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"runtime/debug"
	"time"

	"github.com/pgswo/swo/internal/dsn"
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
	// Paused is true while new connections wait for the switch.
	Paused bool `json:"paused"`
	// Node is this instance.
	Node NodeStatus `json:"node"`
	// Old and Next describe the configured databases (Next is nil in normal mode).
	Old  DatabaseStatus  `json:"old"`
	Next *DatabaseStatus `json:"next,omitempty"`
	// LastError is the last error this node saw, if any.
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
	LastSeen    time.Time `json:"last_seen"`
}

// DatabaseStatus describes one configured database. Addr never contains a password.
type DatabaseStatus struct {
	Addr     string `json:"addr"`
	ID       string `json:"id,omitempty"`
	Obsolete bool   `json:"obsolete"`
}
