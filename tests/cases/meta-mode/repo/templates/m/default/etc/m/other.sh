other.sh
