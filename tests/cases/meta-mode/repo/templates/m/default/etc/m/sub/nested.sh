sub/nested.sh
