// Command compose-check validates deploy/compose/docker-compose.yml without
// a container engine: it loads the file with compose-go (the loader of
// `docker compose` itself: Compose-spec schema, YAML anchors and merges,
// interpolation, depends_on targets), then checks that every bind-mounted
// source and build context exists and that every TollGuard service is built
// from the repository's Dockerfile with a valid BIN build argument.
//
//	go run . ../docker-compose.yml   (deploy/k8s/validate.sh builds and runs it)
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
)

var bins = map[string]bool{
	"tollguard-ingester": true, "tollguard-correlator": true,
	"tollguard-notifier": true, "tollguard": true,
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check docker-compose.yml")
		os.Exit(2)
	}
	file, err := filepath.Abs(os.Args[1])
	if err != nil {
		fail(err)
	}
	opts, err := cli.NewProjectOptions([]string{file},
		cli.WithWorkingDirectory(filepath.Dir(file)),
		cli.WithName("tollguard"),
		cli.WithInterpolation(true),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		fail(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	var problems []string
	names := make([]string, 0, len(project.Services))
	for name := range project.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	built := map[string]string{}
	for _, name := range names {
		svc := project.Services[name]
		for _, v := range svc.Volumes {
			if v.Type == types.VolumeTypeBind {
				if _, err := os.Stat(v.Source); err != nil {
					problems = append(problems, fmt.Sprintf("service %s: bind source %s: %v", name, v.Source, err))
				}
			}
		}
		if svc.Build != nil {
			df := svc.Build.Dockerfile
			if !filepath.IsAbs(df) {
				df = filepath.Join(svc.Build.Context, df)
			}
			if _, err := os.Stat(df); err != nil {
				problems = append(problems, fmt.Sprintf("service %s: Dockerfile %s: %v", name, df, err))
			}
			bin := svc.Build.Args["BIN"]
			if bin == nil || !bins[*bin] {
				problems = append(problems, fmt.Sprintf("service %s: build arg BIN must be one of the four binaries", name))
			} else {
				built[name] = *bin
			}
		}
		for dep := range svc.DependsOn {
			if _, ok := project.Services[dep]; !ok {
				problems = append(problems, fmt.Sprintf("service %s depends on unknown service %s", name, dep))
			}
		}
	}
	for _, want := range []string{"tollguard-ingester", "tollguard-correlator", "tollguard-notifier"} {
		found := 0
		for _, b := range built {
			if b == want {
				found++
			}
		}
		if found == 0 {
			problems = append(problems, "no service is built with BIN="+want)
		}
		if want == "tollguard-ingester" && found < 2 {
			problems = append(problems, "expected at least two carriers' ingesters")
		}
	}
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "compose-check:", p)
		}
		os.Exit(1)
	}
	fmt.Printf("compose-check: %s is valid: %d services (%s)\n", filepath.Base(file), len(names), strings.Join(names, ", "))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose-check:", err)
	os.Exit(1)
}
