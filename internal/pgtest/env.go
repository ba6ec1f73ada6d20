package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"

	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/dsn"
)

// startEnv uses the existing server named by SWO_TEST_DATABASE_URL.
func startEnv(ctx context.Context) (*Server, error) {
	raw := os.Getenv(EnvURL)
	if raw == "" {
		return nil, errors.New(EnvURL + " is not set")
	}
	cfg, err := pgx.ParseConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("%s does not parse (password not shown)", EnvURL)
	}
	s := &Server{backend: "env", host: cfg.Host, port: int(cfg.Port), user: cfg.User,
		password: cfg.Password, adminDB: cfg.Database}
	if s.adminDB == "" {
		s.adminDB = "postgres"
	}
	if u, err := url.Parse(raw); err == nil && u.Scheme != "" {
		s.params = u.Query()
	} else {
		s.params = url.Values{"sslmode": {"prefer"}}
	}
	c, err := pgx.Connect(ctx, s.AdminURL())
	if err != nil {
		return nil, fmt.Errorf("%s: cannot connect to %s as %s: %v", EnvURL, s.Addr(), s.user, dsn.Scrub(err.Error(), s.password))
	}
	c.Close(ctx)
	return s, nil
}
